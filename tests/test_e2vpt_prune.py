"""E2VPT's pruning (SPEC §12.4(d)): the importance pass and the mask selection against transcriptions of the official
functions, and ``gapt e2vpt-prune`` end to end on a tiny ViT (importance job, rewinds, choice, finals, resume).

Transcribed from ChengHan111/E2VPT @ 7a66e75e (written out here, not imported): ``src/engine/trainer.py::
calculate_importance`` (with ``forward_one_batch(is_train=True)`` and ``SoftmaxLoss``), ``determine_mask_sequence``,
``what_tokens_to_mask``, ``what_tokens_pieces_to_mask``, ``src/solver/lr_scheduler.py::WarmupCosineSchedule`` and
the mask-file loops of ``tune_vtab_PruningRewind_CVK.py::cal_mt_mtp``.
"""
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

import conftest  # noqa: F401  (registers the tiny backbones)

MASK_PERCENT = [10, 20, 30, 40, 50, 60, 70, 80, 90]  # CLS_TOKEN_MASK_PERCENT, CLS_TOKEN_PIECE_MASK_PERCENT


# -- the official selection, transcribed ----------------------------------------------------------------
def official_determine_mask_sequence(n_soft_tokens, n_pieces_token=16, min_tokens=1, min_pieces=4):
    """trainer.py::determine_mask_sequence with CLS_TOKEN_MASK_PERCENT_NUM = CLS_TOKEN_PIECE_MASK_PERCENT_NUM = None."""
    soft_token_mask_number = []
    for prune_percent in MASK_PERCENT:
        total_soft_tokens = n_soft_tokens
        n_to_mask = int(total_soft_tokens * prune_percent / 100)
        if min_tokens > 0:
            if n_to_mask > total_soft_tokens - min_tokens:
                n_to_mask = total_soft_tokens - min_tokens
                soft_token_mask_number.append(n_to_mask)
                break
        soft_token_mask_number.append(n_to_mask)
    soft_token_mask_number = sorted(soft_token_mask_number)
    soft_token_mask_sequence = soft_token_mask_number[:]
    for idx in range(1, len(soft_token_mask_number)):
        soft_token_mask_sequence[idx] = soft_token_mask_number[idx] - soft_token_mask_number[idx - 1]
    assert soft_token_mask_number[-1] == sum(soft_token_mask_sequence)
    token_piece_mask_number = []
    for prune_percent in MASK_PERCENT:
        total_soft_tokens_pieces = n_pieces_token
        n_to_mask = int(total_soft_tokens_pieces * prune_percent / 100)
        if min_pieces > 0:
            if n_to_mask > total_soft_tokens_pieces - min_pieces:
                n_to_mask = total_soft_tokens_pieces - min_pieces
                token_piece_mask_number.append(n_to_mask)
                break
        token_piece_mask_number.append(n_to_mask)
    token_piece_mask_number = sorted(token_piece_mask_number)
    token_piece_mask_sequence = token_piece_mask_number[:]
    for idx in range(1, len(token_piece_mask_number)):
        token_piece_mask_sequence[idx] = token_piece_mask_number[idx] - token_piece_mask_number[idx - 1]
    assert token_piece_mask_number[-1] == sum(token_piece_mask_sequence)
    return soft_token_mask_sequence, token_piece_mask_sequence


def official_what_tokens_pieces_to_mask(soft_tokens_pieces_importance, n_to_mask, soft_tokens_pieces_to_mask,
                                        n_pieces_token=16, n_soft_tokens=20, reverse=False):
    """trainer.py::what_tokens_pieces_to_mask"""
    assert n_soft_tokens == soft_tokens_pieces_importance.size()[0]
    assert n_pieces_token == soft_tokens_pieces_importance.size()[1]
    for soft_token_idx in range(n_soft_tokens):
        score = soft_tokens_pieces_importance[soft_token_idx]
        if soft_token_idx not in soft_tokens_pieces_to_mask:
            soft_tokens_pieces_to_mask[soft_token_idx] = set()
        soft_token_pieces_and_score = [(soft_token_piece, score[soft_token_piece])
                                       for soft_token_piece in range(n_pieces_token)]
        soft_token_pieces_and_score = sorted(soft_token_pieces_and_score, key=lambda x: x[1], reverse=reverse)
        sorted_soft_token_pieces = [s[0] for s in soft_token_pieces_and_score]
        sorted_soft_token_pieces = [p for p in sorted_soft_token_pieces
                                    if p not in soft_tokens_pieces_to_mask[soft_token_idx]]
        for soft_token_piece in sorted_soft_token_pieces[:n_to_mask]:
            soft_tokens_pieces_to_mask[soft_token_idx].add(soft_token_piece)
    return soft_tokens_pieces_to_mask


def official_what_tokens_to_mask(soft_tokens_importance, n_to_mask, soft_tokens_to_mask, n_soft_tokens=20,
                                 reverse=False):
    """trainer.py::what_tokens_to_mask"""
    soft_tokens_and_score = [(t, soft_tokens_importance[t]) for t in range(n_soft_tokens)]
    soft_tokens_and_score = sorted(soft_tokens_and_score, key=lambda x: x[1], reverse=reverse)
    sorted_soft_tokens = [s[0] for s in soft_tokens_and_score]
    sorted_soft_tokens = [t for t in sorted_soft_tokens if t not in soft_tokens_to_mask]
    for soft_token in sorted_soft_tokens[:n_to_mask]:
        soft_tokens_to_mask.add(soft_token)
    return soft_tokens_to_mask


def official_mask_files(tokens_importance, pieces_importance, reverse=False):
    """tune_vtab_PruningRewind_CVK.py::cal_mt_mtp's loops: {file count: content} of mask_tokens/ and
    mask_tokens_pieces/ (a count seen twice rewrites its file with the same content)."""
    n_soft = tokens_importance.shape[0]
    tokens_seq, pieces_seq = official_determine_mask_sequence(n_soft)
    token_files, piece_files = {}, {}
    soft_tokens_to_mask, total_masked = set(), 0
    for n_to_mask in tokens_seq:
        soft_tokens_to_mask = official_what_tokens_to_mask(tokens_importance, n_to_mask, soft_tokens_to_mask,
                                                           n_soft_tokens=n_soft, reverse=reverse)
        total_masked += n_to_mask
        token_files[total_masked] = sorted(soft_tokens_to_mask)
    soft_tokens_pieces_to_mask, total = {}, 0
    for n_to_mask in pieces_seq:
        soft_tokens_pieces_to_mask = official_what_tokens_pieces_to_mask(
            pieces_importance, n_to_mask, soft_tokens_pieces_to_mask, n_pieces_token=16, n_soft_tokens=n_soft,
            reverse=reverse)
        total += n_to_mask
        piece_files[total] = [sorted(soft_tokens_pieces_to_mask[t]) for t in range(n_soft)]
    return token_files, piece_files


@pytest.mark.parametrize("m_p", [1, 2, 5, 10, 32])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_mask_selection_equals_official(m_p, reverse, ties):
    from gapt.model.parts.kv_prompts import prune_masks
    g = torch.Generator().manual_seed(m_p + 10 * reverse + 100 * ties)
    tokens = torch.randn(m_p, generator=g)
    pieces = torch.randn(m_p, 16, generator=g)
    if ties:  # equal scores: the official stable sort keeps index order
        tokens, pieces = (tokens * 2).round() / 2, (pieces * 2).round() / 2
    token_files, piece_files = official_mask_files(tokens, pieces, reverse)
    ours = prune_masks(tokens.tolist(), pieces.tolist(), reverse)
    assert ours["tokens"] == token_files
    assert ours["pieces"] == piece_files


def test_mask_counts_examples():
    from gapt.model.parts.kv_prompts import mask_counts
    assert mask_counts(10, 1) == list(range(1, 10))
    assert mask_counts(5, 1) == [0, 1, 2, 3, 4]
    assert mask_counts(1, 1) == [0]
    assert mask_counts(16, 4) == [1, 3, 4, 6, 8, 9, 11, 12]  # 72 rewinds for M_p = 10, as the official comment


# -- the importance pass against calculate_importance ---------------------------------------------------------------
def official_warmup_cosine(optimizer, warmup_steps, t_total, cycles=.5):
    """src/solver/lr_scheduler.py::WarmupCosineSchedule (LambdaLR: the lr at construction is lr_lambda(0))."""
    def lr_lambda(step):
        if step < warmup_steps:
            return float(step) / float(max(1.0, warmup_steps))
        progress = float(step - warmup_steps) / float(max(1, t_total - warmup_steps))
        return max(0.0, 0.5 * (1. + math.cos(math.pi * float(cycles) * 2.0 * progress)))
    return LambdaLR(optimizer, lr_lambda)


def official_calculate_importance(model, train_loader, optimizer, n_pieces_token=16, n_soft_tokens=20):
    """trainer.py::calculate_importance on an "ssl-vit" model (the masks live on enc itself; gapt's model root),
    with forward_one_batch(X, targets, True) and SoftmaxLoss (class weights "none": ones) inlined."""
    prompt_model = model
    prompt_model.eval()
    soft_tokens_importance = torch.zeros(n_soft_tokens)
    soft_tokens_pieces_importance = torch.zeros(n_soft_tokens, n_pieces_token)
    total_len = 0
    for step, (X, targets) in enumerate(train_loader):
        targets = torch.as_tensor(targets)
        with torch.set_grad_enabled(True):
            outputs = model(X)
            weight = torch.tensor([1.0] * outputs.shape[1])
            loss = torch.sum(F.cross_entropy(outputs, targets, weight, reduction="none")) / targets.shape[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        soft_tokens_importance += prompt_model.prompt_soft_tokens_mask_cls_token.grad
        for token_i in range(n_soft_tokens):
            soft_tokens_pieces_importance[token_i] += prompt_model.prompt_soft_tokens_pieces_mask_cls_token.grad[token_i]
        total_len += 1
    soft_tokens_importance /= total_len
    soft_tokens_pieces_importance /= total_len
    return soft_tokens_importance, soft_tokens_pieces_importance


def tiny_cfg(tmp_path, name="run", **over):
    from gapt.config import load_config
    items = {"backbone": "test_mae_tiny", "weights": "null", "image_size": 32, "method": "e2vpt", "num_prompts": 2,
             "kv_prompts": 2, "data.format": "shapes", "data.name": "count", "data.num_samples": 48,
             "data.num_workers": 0, "train.epochs": 2, "train.warmup_epochs": 0, "train.batch_size": 16,
             "train.lr": 0.5, "train.logger": "none", "device": "cpu", "out": str(tmp_path / name), **over}
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def trained_masks(cfg, seed=5):
    """The tuned state of a pre-pruning run stand-in: every tensor (masks included) off its init."""
    from gapt.data import build_datasets
    from gapt.engine.trainer import model_from_config, tuned_state
    bundle = build_datasets(cfg.data, image_size=cfg.image_size, seed=cfg.train.seed, splits=("train",))
    model = model_from_config(cfg, bundle.num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return tuned_state(model), bundle


@pytest.mark.parametrize("warmup", [0, 1])
def test_importance_equals_calculate_importance(tmp_path, warmup):
    """Warm-up 0: the fresh scheduler runs the base lr and the weights drift during the pass (the optimizer steps);
    warm-up > 0: its first lr is 0. Either way gapt's pass gives the official scores."""
    from torch.utils.data import DataLoader, DistributedSampler
    from gapt.engine.importance import mask_importance
    from gapt.engine.trainer import model_from_config, set_tuned_state
    cfg = tiny_cfg(tmp_path, **{"train.warmup_epochs": warmup, "train.epochs": 3, "train.weight_decay": 0.0})
    tuned, bundle = trained_masks(cfg)
    ours = mask_importance(cfg, tuned)
    assert ours["lr"] == ([0.5] if warmup == 0 else [0.0]) and ours["batches"] == 3

    random.seed(0)
    model = model_from_config(cfg, bundle.num_classes)
    set_tuned_state(model, tuned)
    loader = DataLoader(bundle.train, batch_size=16, shuffle=False,  # the same batches: the run's seeded shuffle
                        sampler=DistributedSampler(bundle.train, num_replicas=1, rank=0, shuffle=True, seed=42))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([{"params": [p], "lr": 0.5, "weight_decay": 0.0} for p in params], 0.5, momentum=0.9,
                                weight_decay=0.0)  # make_optimizer (SGD branch, WEIGHT_DECAY 0)
    official_warmup_cosine(optimizer, warmup_steps=warmup, t_total=3)
    tokens, pieces = official_calculate_importance(model, loader, optimizer, n_pieces_token=16, n_soft_tokens=2)
    torch.testing.assert_close(torch.tensor(ours["token_scores"]), tokens, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ours["piece_scores"]), pieces, rtol=1e-4, atol=1e-6)
    assert tokens.abs().sum() > 0


# -- the pipeline ------------------------------------------------------------------------------------------------------
def pre_pruning_run(tmp_path):
    from gapt.engine.trainer import train
    cfg = tiny_cfg(tmp_path)
    train(cfg)
    return cfg


class StopAfter:
    """An inline executor that stops (as a Ctrl-C would) after ``n`` finished jobs."""

    def __init__(self, n):
        from gapt.sweep.executors import InlineExecutor
        self.inner, self.n, self.name = InlineExecutor(), n, "inline"

    def run(self, jobs, on_start, on_end, early_stop=False):
        def end(job, status, error):
            on_end(job, status, error)
            self.n -= 1
            if self.n <= 0:
                raise KeyboardInterrupt
        self.inner.run(jobs, on_start, end)


def test_prune_pipeline_end_to_end_and_resume(tmp_path, monkeypatch):
    from gapt.model.parts import kv_prompts
    from gapt.sweep.e2vpt_prune import run_prune
    from gapt.sweep.executors import InlineExecutor
    from gapt.sweep.jobs import SweepError
    monkeypatch.setattr(kv_prompts, "PRUNE_PERCENTS", (50, 90))  # tokens {1}, pieces {8, 12}: two rewinds
    cfg = pre_pruning_run(tmp_path)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # stopped after the importance job and the first rewind
        run_prune(run, seeds=[42, 44], executor=StopAfter(2))
    state = json.loads((run / "prune" / "prune.json").read_text())
    assert state["status"] == "interrupted" and state["importance"]["batches"] == 3
    first = run / "prune" / "trials" / "t1_p8" / "results.json"
    stamp = first.stat().st_mtime_ns

    state = run_prune(run, seeds=[42, 44], executor=InlineExecutor())
    assert first.stat().st_mtime_ns == stamp  # kept, not trained again
    assert state["status"] == "done" and [r["name"] for r in state["rewinds"]] == ["t1_p8", "t1_p12"]
    masks = json.loads((run / "prune" / "masks.json").read_text())
    scores = state["importance"]
    lowest = min(range(2), key=lambda t: scores["token_scores"][t])
    assert masks["tokens"] == {"1": [lowest]}
    assert json.loads((run / "prune" / "mask_tokens" / "1_soft_tokens_to_mask.json").read_text()) == {"1": [lowest]}
    rewound = json.loads((run / "prune" / "trials" / "t1_p12" / "results.json").read_text())
    assert rewound["e2vpt_masks"] == "fixed" and rewound["e2vpt_masked_tokens"] == [lowest]
    assert all(len(row) == 12 for row in rewound["e2vpt_masked_pieces"])
    assert rewound["seed"] == cfg.train.seed + 1 and rewound["lr"] == cfg.train.lr
    best = max(state["rewinds"], key=lambda r: (r["val_top1_last"], r["tokens"], r["pieces"]))
    assert state["choice"]["name"] == best["name"]
    finals = [json.loads((run / "prune" / "final" / f"seed{s}" / "results.json").read_text()) for s in (42, 44)]
    assert all(f["final"] and f["e2vpt_masked_pieces"] == state["choice"]["masked_pieces"] for f in finals)
    assert state["final_test_top1_last"]["n"] == 2

    with pytest.raises(SweepError, match="other settings"):  # the other order gives other masks
        run_prune(run, seeds=[42, 44], reverse=True, executor=InlineExecutor())


def test_choice_rule():
    from gapt.sweep.e2vpt_prune import choose
    records = [dict(name="t1_p3", status="done", val_top1_last=50.0, tokens=1, pieces=3),
               dict(name="t3_p1", status="done", val_top1_last=50.0, tokens=3, pieces=1),
               dict(name="t3_p4", status="done", val_top1_last=50.0, tokens=3, pieces=4),
               dict(name="t4_p1", status="failed", val_top1_last=60.0, tokens=4, pieces=1),
               dict(name="t2_p9", status="done", val_top1_last=49.5, tokens=2, pieces=9)]
    assert choose(records)["name"] == "t3_p4"  # ties: more masked tokens, then more pieces; failed runs never


def test_refuses_a_run_without_learned_masks_and_dry_run_via_cli(tmp_path, capsys):
    from gapt.cli import main
    from gapt.engine.trainer import train
    train(tiny_cfg(tmp_path, "fixed", e2vpt_masks="fixed", **{"train.epochs": 1}))
    assert main(["e2vpt-prune", str(tmp_path / "fixed"), "--dry-run"]) == 1
    assert "e2vpt_masks=learned" in capsys.readouterr().err
    train(tiny_cfg(tmp_path, "learned", **{"train.epochs": 1}))
    assert main(["e2vpt-prune", str(tmp_path / "learned"), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["token_counts"] == [0, 1] and len(plan["rewinds"]) == 16 and plan["importance"] == "new"
