"""SPT and VIPAMIN presets (SPEC §12.1(d), §12.2(d)), written by scripts/make_presets.py:

    gapt/configs/{fgvc,vtab}/<backbone>/spt-shallow/<task>.yaml    vpt-shallow, 100 prompts, prompt_init spt
    gapt/configs/{fgvc,vtab}/<backbone>/spt-deep/<task>.yaml       vpt-deep, 20 per block, prompt_init spt
    gapt/configs/{fgvc,vtab}/<backbone>/vipamin/<task>.yaml        vpt-shallow, 100 prompts, prompt_init vipamin
    gapt/configs/{fgvc,vtab}/<backbone>/vipamin-deep/<task>.yaml   vpt-deep, 20 per block, prompt_init vipamin

SPT (WangYZ1608/Self-Prompt-Tuning @ ce0754f, README + train_MAE.py / train_MoCo.py): AdamW, prompts at
``--weight_decay`` 1e-2, the head's weight at ``--wd_head``, biases at 0 (``param_groups_weight_decay``),
batch 32, 100 epochs, 10 warm-up, per-iteration cosine (to 1e-8: gapt's goes to 0), no prompt dropout, no
drop-path. Its per-task recipes are only in an external share: the README gives MAE CUB SPT-deep (lr 5e-2,
wd_head 0.5) and Dogs SPT-deep (lr 1e-3, wd_head 3.0, the MoCo / supervised command); every other preset
takes its backbone's README values and is marked as needing the lr sweep (``gapt sweep --grid spt``).

VIPAMIN (iamjaekyun/vipamin @ ebce4e4, gen_yaml_*.py, configs/base-*.yaml, src/configs/config.py,
run_indiv.sh): the VPT codebase's HF-style AdamW, weight decay 0.01 on everything but names with "bias"
(the head's bias), batch 32, 100 epochs, 10 warm-up, cosine stepped per epoch (the VPT scheduler),
prompt dropout 0 (the config default), MAE read out by the fresh ``fc_norm`` (``mean_fc_norm``). lr and
(k, lambda) are searched per task (``gapt sweep --grid vipamin``: base lr {0.05 .. 5} x 32/256 and 9 (k, lambda)
pairs); the values here are placeholders. VIPAMIN's FGVC runs are few-shot: the FGVC presets take the VTAB recipe.
"""
from typing import Callable, Dict, List

# backbone -> (lr, wd_head) of SPT's README command for that pre-training
SPT_README = {"mae_vitb16": (5e-2, 0.5, "cub", "MAE CUB-200 SPT-deep"),
              "mocov3_vitb16": (1e-3, 3.0, "dogs", "Dogs-120 SPT-deep (the MoCo / supervised command)")}
VARIANTS = {"spt-shallow": ("vpt-shallow", 100), "spt-deep": ("vpt-deep", 20),
            "vipamin": ("vpt-shallow", 100), "vipamin-deep": ("vpt-deep", 20)}


def _train(lr: float, lr_note: str, head: str, schedule: str) -> str:
    return (f"train:\n  epochs: 100\n  warmup_epochs: auto       # 10 at 100 epochs\n  batch_size: 32\n"
            f"  lr: {lr:g}{' ' * max(1, 22 - len(f'{lr:g}'))}# {lr_note}\n"
            f"  weight_decay: 0.01\n{head}  head_bias_decay: false    # no decay on biases (the head's)\n"
            f"  optimizer: adamw\n  schedule: {schedule}\n  seed: 42\n"
            f"  precision: fp32           # the official runs' precision\n")


def spt(backbone: str, variant: str, benchmark: str, task: str, weights: str, data: str) -> str:
    method, prompts = VARIANTS[variant]
    lr, wd_head, readme_task, readme = SPT_README[backbone]
    exact = variant == "spt-deep" and task == readme_task and benchmark == "fgvc"
    sweep = "" if exact else (f"# NEEDS THE LR SWEEP: SPT's per-task recipes are not released; lr and wd_head are its "
                              f"README's {readme} values.\n#   gapt sweep --config <this file> --grid spt "
                              f"weights=... data.root=...\n")
    return (f"# {'FGVC' if benchmark == 'fgvc' else 'VTAB-1k'} {task} with {backbone}: SPT ({variant}), its released "
            f"sampler (SPEC §12.1): prompts are single patch tokens\n# of training images ("
            f"{'one image' if backbone.startswith('mocov3') else 'the train set resampled with replacement'}, as "
            f"{'train_MoCo.py' if backbone.startswith('mocov3') else 'train_MAE.py'}).\n"
            f"backbone: {backbone}\nweights: {weights}\n{sweep}method: {method}\nnum_prompts: {prompts}"
            f"{'             # per block' if method == 'vpt-deep' else ''}\nprompt_init: spt\n"
            f"spt_images: 0             # 0 = the official script's: 1 (MoCo v3), else the train set's size\n"
            f"prompt_dropout: 0.0\nlearn_temperature: false\nimage_size: 224\n" + data
            + _train(lr, "SPT README" if exact else "placeholder: searched by gapt sweep --grid spt",
                     f"  head_weight_decay: {wd_head:g}    # SPT's --wd_head\n", "cosine")
            + f"out: runs/{benchmark}/{task}-{backbone}-{variant}\n")


def vipamin(backbone: str, variant: str, benchmark: str, task: str, weights: str, data: str) -> str:
    method, prompts = VARIANTS[variant]
    pooling = "pooling: mean_fc_norm      # the VPT codebase's MAE readout: mean, then a fresh fc_norm\n" \
        if backbone.startswith("mae") else ""
    bench = "FGVC" if benchmark == "fgvc" else "VTAB-1k"
    return (f"# {bench} {task} with {backbone}: VIPAMIN ({variant}; SPEC §12.2): matching + orthogonal prompt init, "
            f"then VPT.\n"
            f"# NEEDS THE GRID SWEEP: lr and (vipamin_k, vipamin_lambda) are searched per task, as VIPAMIN does;\n"
            f"#   gapt sweep --config <this file> --grid vipamin weights=... data.root=...\n"
            f"backbone: {backbone}\nweights: {weights}\nmethod: {method}\nnum_prompts: {prompts}"
            f"{'             # per block' if method == 'vpt-deep' else ''}\nprompt_init: vipamin\n"
            f"vipamin_k: 32               # placeholder: searched in {{2, 8, 32, 128}}\n"
            f"vipamin_lambda: 0.5         # placeholder: searched in {{0, 0.5, 1}}\n"
            f"prompt_dropout: 0.0\nlearn_temperature: false\n{pooling}image_size: 224\n" + data
            + _train(0.0625, "placeholder (base 0.5 x 32/256): searched by gapt sweep --grid vipamin", "",
                     "cosine_epoch")
            + f"out: runs/{benchmark}/{task}-{backbone}-{variant}\n")


def write_all(root, backbones: Dict[str, str], fgvc: Dict[str, str], vtab: List[str], data_block: Callable,
              write: Callable) -> None:
    for backbone, weights in backbones.items():
        tasks = [("fgvc", t, data_block("fgvc", t, f"/path/to/{folder}")) for t, folder in fgvc.items()]
        tasks += [("vtab", t, data_block("vtab", t, "/path/to/vtab-1k")) for t in vtab]
        for benchmark, task, data in tasks:
            for variant in VARIANTS:
                make = spt if variant.startswith("spt") else vipamin
                write(root / benchmark / backbone / variant / f"{task}.yaml",
                      make(backbone, variant, benchmark, task, weights, data))
