"""VFPT and E2VPT presets (SPEC §12.3(d), §12.4(d)), written by scripts/make_presets.py:

    gapt/configs/{fgvc,vtab}/<backbone>/vfpt/<task>.yaml     Fourier prompts, the README's recipe
    gapt/configs/{fgvc,vtab}/<backbone>/e2vpt/<task>.yaml    key-value + masked prompts, command.txt's sizes

Both are VPT-codebase forks: SGD momentum 0.9, 100 epochs, 10 warm-up, cosine stepped per epoch (the VPT
scheduler: ``train.schedule: cosine_epoch``), no weight decay on the head's bias (``last_layer.bias``:
``head_bias_decay: false``), MAE read out by the fresh ``fc_norm`` (``pooling: mean_fc_norm``), MoCo v3 by its
norm on CLS, lr x wd searched on val (the tune scripts' grid: {50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05} x
batch / 256 on VTAB-1k, without 0.05 on FGVC; wd {0.01, 1e-3, 1e-4, 0}); the lr / wd here are placeholders.

VFPT (runtsang/VFPT @ 1b3d9846, README and configs/base-prompt_fourier_{mae,moco}.yaml): deep, 10 prompts, alpha
1.0, prompt dropout 0.1, batch 64. Per-task prompt counts and alphas are only in an external sheet (README's
"Hyperparameter for VTAB"), not read here: every task takes the README's command. No MAE / MoCo FGVC recipe
exists: the FGVC presets take the VTAB one.

E2VPT (ChengHan111/E2VPT @ 7a66e75e, command.txt "ssl mae / ssl moco", tune_vtab_PruningRewind_CVK.py): deep
visual prompts (M_p per task) with token / piece masks trained as gates, key-value prompts (M_kv per task),
prompt dropout 0.1, batch 128 (VTAB-1k; FGVC: 128 MAE, 64 MoCo), KV init ORIGIN_INIT 2 (kaiming). After the
sweep: ``gapt e2vpt-prune <sweep folder>``.
"""
from typing import Callable, Dict, List

VPT_LR = (50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05)
WD = "0.01,0.001,0.0001,0"

# command.txt (ssl mae and ssl moco VTAB-1k: the same sizes): task -> (NUM_TOKENS_P, NUM_TOKENS)
E2VPT_VTAB = {"caltech101": (32, 5), "cifar": (5, 5), "dtd": (10, 5), "oxford_flowers102": (1, 1),
              "oxford_iiit_pet": (10, 5), "sun397": (10, 5), "svhn": (10, 5), "diabetic_retinopathy": (10, 5),
              "eurosat": (10, 5), "patch_camelyon": (10, 10), "resisc45": (10, 5), "clevr_count": (10, 5),
              "clevr_dist": (10, 5), "dmlab": (10, 5), "dsprites_loc": (5, 5), "dsprites_ori": (5, 5),
              "kitti": (10, 5), "smallnorb_azi": (10, 5), "smallnorb_ele": (10, 5)}
E2VPT_FGVC = (5, 5)
E2VPT_FGVC_BATCH = {"mae_vitb16": 128, "mocov3_vitb16": 64}


def lr_list(batch: int, fgvc: bool) -> str:
    """The tune scripts' lrs at ``batch`` (lr / 256 * batch), as a sweep override."""
    return ",".join(f"{lr * batch / 256:g}" for lr in VPT_LR if not (fgvc and lr == 0.05))


def _train(batch: int) -> str:
    return (f"train:\n  epochs: 100\n  warmup_epochs: auto       # 10 at 100 epochs\n  batch_size: {batch}\n"
            f"  lr: 0.1                   # placeholder: searched by gapt sweep\n"
            f"  weight_decay: 0.0001      # placeholder (the base config's): searched by gapt sweep\n"
            f"  head_bias_decay: false    # the VPT codebase's SGD: no decay on last_layer.bias\n"
            f"  optimizer: sgd\n  momentum: 0.9\n"
            f"  schedule: cosine_epoch    # the VPT scheduler steps once per epoch\n  seed: 42\n"
            f"  precision: fp32           # the official runs' precision\n")


def _sweep(method: str, benchmark: str, batch: int) -> str:
    grid = f"--grid {method}" if benchmark == "vtab" else \
        f"--grid none train.lr={lr_list(batch, True)} train.weight_decay={WD}"
    return (f"# NEEDS THE LR SWEEP (lr x wd on val, as {'VFPT' if method == 'vfpt' else 'E2VPT'}'s tune script):\n"
            f"#   gapt sweep --config <this file> {grid} --seeds 5 weights=... data.root=...\n")


def vfpt(backbone: str, benchmark: str, task: str, weights: str, data: str) -> str:
    pooling = "pooling: mean_fc_norm      # MAE: mean of prompts + patches, then the fresh fc_norm\n" \
        if backbone.startswith("mae") else ""
    fgvc = "; no MAE / MoCo FGVC recipe exists: the VTAB-1k one" if benchmark == "fgvc" else ""
    return (f"# {'FGVC' if benchmark == 'fgvc' else 'VTAB-1k'} {task} with {backbone}, VFPT (SPEC §12.3): the README's "
            f"recipe (deep, 10 prompts, alpha 1.0, dropout 0.1, batch 64){fgvc}.\n"
            f"# Per-task prompt counts and alphas are in VFPT's external sheet only.\n"
            f"backbone: {backbone}\nweights: {weights}\n" + _sweep("vfpt", benchmark, 64)
            + f"method: vfpt\nnum_prompts: 10                # per block\nfourier_fraction: 1.0\n"
              f"prompt_dropout: 0.1\n{pooling}image_size: 224\n" + data + _train(64)
            + f"out: runs/{benchmark}/{task}-{backbone}-vfpt\n")


def e2vpt(backbone: str, benchmark: str, task: str, weights: str, data: str) -> str:
    prompts, kv = E2VPT_VTAB[task] if benchmark == "vtab" else E2VPT_FGVC
    batch = 128 if benchmark == "vtab" else E2VPT_FGVC_BATCH[backbone]
    pooling = "pooling: mean_fc_norm      # MAE: mean of prompts + patches, then the fresh fc_norm\n" \
        if backbone.startswith("mae") else ""
    return (f"# {'FGVC' if benchmark == 'fgvc' else 'VTAB-1k'} {task} with {backbone}, E2VPT before pruning (SPEC §12.4): "
            f"command.txt's sizes and batch.\n"
            f"backbone: {backbone}\nweights: {weights}\n" + _sweep("e2vpt", benchmark, batch)
            + f"# then prune and rewind:  gapt e2vpt-prune <the sweep's out>\n"
              f"method: e2vpt\nnum_prompts: {prompts}{' ' * max(1, 15 - len(str(prompts)))}# visual prompts per block "
              f"(NUM_TOKENS_P)\nkv_prompts: {kv}{' ' * max(1, 16 - len(str(kv)))}# key-value prompts per block and "
              f"head (NUM_TOKENS)\ne2vpt_masks: learned      # token / piece masks trained as gates until pruning\n"
              f"prompt_dropout: 0.1\n{pooling}image_size: 224\n" + data + _train(batch)
            + f"out: runs/{benchmark}/{task}-{backbone}-e2vpt\n")


def write_all(root, backbones: Dict[str, str], fgvc: Dict[str, str], vtab: List[str], data_block: Callable,
              write: Callable) -> None:
    for backbone, weights in backbones.items():
        tasks = [("fgvc", t, data_block("fgvc", t, f"/path/to/{folder}")) for t, folder in fgvc.items()]
        tasks += [("vtab", t, data_block("vtab", t, "/path/to/vtab-1k")) for t in vtab]
        for benchmark, task, data in tasks:
            write(root / benchmark / backbone / "vfpt" / f"{task}.yaml", vfpt(backbone, benchmark, task, weights, data))
            write(root / benchmark / backbone / "e2vpt" / f"{task}.yaml", e2vpt(backbone, benchmark, task, weights, data))
