"""Write the preset configs under gapt/configs/ from the paper's Table 5 (SPEC §8); rerun after changing them.

    python scripts/make_presets.py

Ours (gated prompts + learnable temperature) gets Table 5's batch, prompts, lr and gate_init per
task and backbone, with SGD, weight decay 0, prompt dropout 0.1, seed 42, 100 epochs (10 warm-up),
fp32. data.final stays false (train on train, select on val); the sweep's and `gapt reproduce`'s
final runs set data.final=true, which trains on the reference's final split (FGVC train.json,
VTAB-1k train800val200). VPT-shallow / VPT-deep baselines (``<benchmark>/<backbone>/vpt-*/<task>.yaml``)
use the paper's prompt counts and are marked as needing the lr sweep: the paper prints no
settings for them. The table below is data; tests/test_presets.py keeps its own copy of SPEC §8.

PEFT baselines (``<benchmark>/<backbone>/{lora,adaptformer,bitfit,ssf}/<task>.yaml``) carry each one's recipe as
its official / VTAB code runs it (SPEC §12.6, ``PEFT_RECIPES`` below): AdamW for LoRA, AdaptFormer and SSF, SGD
for BitFit (the VPT codebase's ``tinytl-bias``); those without a fixed lr in the literature are marked as needing
the lr sweep.

DA-VPT+ and DA-VPT (``<benchmark>/<backbone>/{da-vpt-plus,da-vpt}/<task>.yaml``): the authors' per-task configs,
transcribed in scripts/davpt_presets.py (SPEC §12.5(d)).

SPT and VIPAMIN (``<benchmark>/<backbone>/{spt-shallow,spt-deep,vipamin,vipamin-deep}/<task>.yaml``): their
recipes, in scripts/init_presets.py (SPEC §12.1(d), §12.2(d)).

VFPT and E2VPT (``<benchmark>/<backbone>/{vfpt,e2vpt}/<task>.yaml``): their recipes, in scripts/vfpt_e2vpt_presets.py
(SPEC §12.3(d), §12.4(d)).
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "gapt" / "configs"
BACKBONES = {
    "mae_vitb16": "/path/to/mae_pretrain_vit_base.pth",
    "mocov3_vitb16": "/path/to/linear-vit-b-300ep.pth.tar",
}
FGVC = {"cub": "CUB_200_2011", "nabirds": "nabirds", "flowers": "OxfordFlower", "dogs": "Stanford-dogs",
        "cars": "Stanford-cars"}
VTAB = ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397", "patch_camelyon",
        "eurosat", "resisc45", "diabetic_retinopathy", "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc",
        "dsprites_ori", "smallnorb_azi", "smallnorb_ele"]

# Table 5: task -> {backbone: (batch, prompts, lr, gate_init)}
TABLE5 = {
    "caltech101": {"mae_vitb16": (128, 1, 0.5, 5), "mocov3_vitb16": (128, 10, 2.5, 4)},
    "cifar": {"mae_vitb16": (128, 1, 0.25, 5), "mocov3_vitb16": (128, 10, 1, 15)},
    "clevr_dist": {"mae_vitb16": (128, 1, 0.1, 15), "mocov3_vitb16": (128, 5, 1, 10)},
    "clevr_count": {"mae_vitb16": (128, 1, 0.05, 15), "mocov3_vitb16": (128, 5, 0.5, 5)},
    "diabetic_retinopathy": {"mae_vitb16": (128, 5, 0.05, 10), "mocov3_vitb16": (128, 5, 0.5, 5)},
    "dmlab": {"mae_vitb16": (128, 1, 0.1, 5), "mocov3_vitb16": (128, 1, 1, 5)},
    "dsprites_ori": {"mae_vitb16": (128, 1, 0.05, 5), "mocov3_vitb16": (128, 5, 0.5, 5)},
    "dsprites_loc": {"mae_vitb16": (128, 1, 0.1, 5), "mocov3_vitb16": (128, 5, 0.5, 5)},
    "dtd": {"mae_vitb16": (128, 1, 0.25, 1), "mocov3_vitb16": (128, 10, 1, 5)},
    "eurosat": {"mae_vitb16": (128, 5, 0.1, 1), "mocov3_vitb16": (128, 10, 1, 5)},
    "kitti": {"mae_vitb16": (128, 5, 0.1, 7), "mocov3_vitb16": (128, 5, 1, 5)},
    "oxford_flowers102": {"mae_vitb16": (128, 1, 0.25, 5), "mocov3_vitb16": (128, 5, 1, 7)},
    "oxford_iiit_pet": {"mae_vitb16": (128, 1, 0.5, 10), "mocov3_vitb16": (64, 100, 1, 1)},
    "patch_camelyon": {"mae_vitb16": (128, 1, 0.05, 5), "mocov3_vitb16": (128, 1, 1, 10)},
    "resisc45": {"mae_vitb16": (128, 10, 0.25, 5), "mocov3_vitb16": (64, 100, 1, 7)},
    "smallnorb_azi": {"mae_vitb16": (128, 1, 0.1, 20), "mocov3_vitb16": (128, 10, 0.5, 3)},
    "smallnorb_ele": {"mae_vitb16": (128, 1, 0.05, 10), "mocov3_vitb16": (128, 5, 0.5, 4)},
    "sun397": {"mae_vitb16": (128, 1, 0.5, 10), "mocov3_vitb16": (128, 1, 1, 4)},
    "svhn": {"mae_vitb16": (128, 1, 0.1, 10), "mocov3_vitb16": (128, 5, 1, 10)},
    "cub": {"mae_vitb16": (64, 100, 0.1, 5), "mocov3_vitb16": (64, 100, 1, 5)},
    "flowers": {"mae_vitb16": (64, 100, 0.1, 15), "mocov3_vitb16": (64, 100, 1, 10)},
    "cars": {"mae_vitb16": (64, 100, 0.25, 5), "mocov3_vitb16": (64, 100, 0.5, 5)},
    "dogs": {"mae_vitb16": (64, 100, 0.5, 15), "mocov3_vitb16": (64, 100, 0.5, 10)},
    "nabirds": {"mae_vitb16": (64, 100, 0.5, 5), "mocov3_vitb16": (64, 100, 1, 5)},
    "ade20k": {"mae_vitb16": (16, 100, 0.001, 10), "mocov3_vitb16": (16, 100, 0.001, 10)},
}
# The paper's prompt counts for the baselines on FGVC (SPEC §6): 100 (shallow), 10 per block (deep).
FGVC_BASELINE_PROMPTS = {"vpt-shallow": 100, "vpt-deep": 10}
HEAD_AND_FULL = ("linear", "full")  # the VPT codebase's linear probe and full fine-tuning: SGD, lr searched on val
SEG_BASELINE_PROMPTS = {"vpt-shallow": 100, "vpt-deep": 10}  # deep per block: gapt's choice (paper: not given)


def train_block(batch: int, lr: float, lr_note: str) -> str:
    return f"""train:
  epochs: 100
  warmup_epochs: auto       # 10 at 100 epochs (SPEC §6); a short smoke run warms up less
  batch_size: {batch}
  lr: {lr:g}{' ' * max(1, 22 - len(f'{lr:g}'))}# {lr_note}
  weight_decay: 0.0
  optimizer: sgd
  momentum: 0.9
  schedule: cosine
  seed: 42
  precision: fp32           # the reference's precision (no AMP, no TF32)
"""


def ours(backbone: str, batch: int, prompts: int, gate_init: float) -> str:
    return (f"method: gated             # gated prompt tuning (GaPT)\n"
            f"gate_type: soft\n"
            f"learn_temperature: true   # + adaptive attention shaping\n"
            f"gate_init: {gate_init:g}{' ' * max(1, 15 - len(f'{gate_init:g}'))}# Table 5; gates start at sigmoid(-{gate_init:g})\n"
            f"num_prompts: {prompts}\n"
            f"prompt_dropout: 0.1\nimage_size: 224\n")


def baseline(method: str, prompts: int, per_block: bool) -> str:
    count = f"{prompts}{'  # per block' if per_block else ''}"
    return (f"# NEEDS THE LR SWEEP: the paper gives no settings for {method}; run\n"
            f"#   gapt sweep --config <this file> weights=... data.root=...   (SPEC §6's lr grid on val)\n"
            f"method: {method}\nlearn_temperature: false\nnum_prompts: {count}\n"
            f"prompt_dropout: 0.1\nimage_size: 224\n")


# SPEC §12.6: method -> (optimizer, lr, weight decay, batch (fgvc, vtab), the method's own keys, where the recipe
# comes from, the lr is fixed by that recipe on VTAB-1k (else: marked as needing the sweep)).
PEFT_RECIPES = {
    "lora": ("adamw", 1e-3, 1e-4, (64, 64), "lora_rank: 8\nlora_alpha: 8             # scale alpha / r = 1 (peft's default)\n"
             "lora_targets: qkv         # one A, B on timm's fused qkv, as peft (SPEC §12.6's recommendation)\n",
             "NOAH's VTAB LoRA: AdamW lr 1e-3, wd 1e-4, batch 64, 100 epochs, 10 warm-up", True),
    "adaptformer": ("adamw", 1e-3, 1e-4, (64, 64), "adapter_dim: 64           # AdaptFormer's ffn_num\n"
                    "adapter_scale: 0.1        # AdaptFormer's ffn_adapter_scalar\nadapter_dropout: 0.1\n",
                    "AdaptFormer (parallel, no input LayerNorm, lora init) with the VTAB re-implementations' AdamW "
                    "lr 1e-3, wd 1e-4, batch 64, 100 epochs, 10 warm-up", True),
    "ssf": ("adamw", 1e-3, 5e-5, (64, 64), "",
            "SSF's VTAB scripts: AdamW, batch 32 x 2 GPUs, 100 epochs, 10 warm-up; lr per task in [1e-3, 5e-2], "
            "wd in {5e-5, 5e-2} (no decay on gamma / beta)", False),
    "bitfit": ("sgd", 0.1, 0.0, (64, 128), "",
               "the VPT codebase's tinytl-bias: SGD momentum 0.9, lr and wd searched on val", False),
}


def peft(backbone: str, method: str, benchmark: str, weights: str, data: str, task: str) -> str:
    opt, lr, wd, batches, keys, source, fixed = PEFT_RECIPES[method]
    batch = batches[0] if benchmark == "fgvc" else batches[1]
    fixed = fixed and benchmark == "vtab"  # no FGVC recipe exists for these baselines
    sweep = "" if fixed else (f"# NEEDS THE LR SWEEP: {method}'s recipe fixes no lr here; run\n"
                              f"#   gapt sweep --config <this file> weights=... data.root=...\n")
    note = "the recipe's" if fixed else "placeholder: searched by gapt sweep"
    train = train_block(batch, lr, note).replace("optimizer: sgd", f"optimizer: {opt}")
    if wd:
        train = train.replace("weight_decay: 0.0", f"weight_decay: {wd:g}")
    if opt != "sgd":
        train = train.replace("  momentum: 0.9\n", "")
    return (f"# {'FGVC' if benchmark == 'fgvc' else 'VTAB-1k'} {task} with {backbone}, the {method} baseline (SPEC §12.6):\n"
            f"# {source}.\n"
            f"# gapt keeps the backbone frozen in eval mode (no drop-path) and fp32, as for every method here.\n"
            f"backbone: {backbone}\nweights: {weights}\n{sweep}method: {method}\n{keys}image_size: 224\n"
            + data + train + f"out: runs/{benchmark}/{task}-{backbone}-{method}\n")


def data_block(fmt: str, name: str, root: str) -> str:
    return f"data:\n  format: {fmt}\n  name: {name}\n  root: {root}\n"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def seg_preset(backbone: str, weights: str, method: str, prompts: int) -> str:
    batch, _, lr, gate_init = TABLE5["ade20k"][backbone]
    if method == "gated":
        head = (f"method: gated             # gated prompt tuning (GaPT); the paper's ADE20K row is plain \"gated\"\n"
                f"gate_type: soft\n"
                f"learn_temperature: false  # the paper reports no temperature for segmentation; true adds AAS\n"
                f"gate_init: {gate_init:g}            # Table 5; gates start at sigmoid(-{gate_init:g})\n"
                f"prompt_dropout: 0.1\nnum_prompts: {prompts}\n")
        title = ""
    else:
        head = (f"method: {method}\nlearn_temperature: false\nprompt_dropout: 0.1\n"
                f"num_prompts: {prompts}{'            # per block (gapt choice; the paper does not say)' if method == 'vpt-deep' else ''}\n")
        title = f" {method} baseline (SPEC §6's lr 0.001, as every segmentation row)"
    return (f"# ADE20K semantic segmentation with {backbone}{title} (SPEC §6: SETR-PUP heads, aux heads on blocks 5 and 9):\n"
            f"# change data.root and weights, nothing else.  gapt seg train --config <this file>\n"
            f"backbone: {backbone}\nweights: {weights}\n{head}"
            f"data:\n  format: ade20k\n"
            f"  root: /path/to/ADEChallengeData2016   # holds images/{{training,validation}}, annotations/{{training,validation}}\n"
            f"  num_workers: 4\n"
            f"train:\n"
            f"  batch_size: {batch}          # in total; split over torchrun processes\n"
            f"  lr: {lr:g}               # Table 5: prompts, gates (and temperatures)\n"
            f"  weight_decay: 0.0\n  optimizer: sgd\n  momentum: 0.9\n  seed: 42\n"
            f"  precision: fp32         # the reference's precision (no AMP, no TF32)\n"
            f"seg:\n  iterations: 160000\n  eval_every: 16000\n"
            f"  head_lr_mult: 10.0      # SETR-PUP decode + auxiliary heads at 0.01\n"
            f"  poly_power: 0.9\n  min_lr: 0.0001          # poly decay floor, reached at the last iteration\n"
            f"  crop_size: 512          # training crop, sliding-window size (stride 341) and position-embedding grid\n"
            + ("  sincos_pos_embed: interpolate  # MoCo's 14x14 table resized bilinearly to 32x32, as MMSegmentation "
               "(rebuild: MoCo's formula at 32x32)\n" if backbone.startswith("mocov3") else "")
            + f"out: runs/ade20k/{backbone}-{method}\n")


def main():
    for backbone, weights in BACKBONES.items():
        for name, folder in FGVC.items():
            batch, prompts, lr, gate_init = TABLE5[name][backbone]
            head = f"backbone: {backbone}\nweights: {weights}\n"
            data = data_block("fgvc", name, f"/path/to/{folder}")
            write(ROOT / "fgvc" / backbone / f"{name}.yaml",
                  f"# FGVC {name} with {backbone}, the paper's settings (Table 5): change data.root and weights.\n"
                  + head + ours(backbone, batch, prompts, gate_init) + data
                  + train_block(batch, lr, "Table 5") + f"out: runs/fgvc/{name}-{backbone}\n")
            for method, n in FGVC_BASELINE_PROMPTS.items():
                write(ROOT / "fgvc" / backbone / method / f"{name}.yaml",
                      f"# FGVC {name} with {backbone}, {method} baseline (SPEC §6 prompt count).\n"
                      + head + baseline(method, n, method == "vpt-deep") + data
                      + train_block(64, 0.1, "placeholder: searched by gapt sweep")
                      + f"out: runs/fgvc/{name}-{backbone}-{method}\n")
            for method in HEAD_AND_FULL:
                write(ROOT / "fgvc" / backbone / method / f"{name}.yaml",
                      f"# FGVC {name} with {backbone}, {method} baseline.\n" + head + baseline(method, 0, False)
                      + data + train_block(64, 0.1, "placeholder: searched by gapt sweep")
                      + f"out: runs/fgvc/{name}-{backbone}-{method}\n")
            for method in PEFT_RECIPES:
                write(ROOT / "fgvc" / backbone / method / f"{name}.yaml", peft(backbone, method, "fgvc", weights, data, name))
        for task in VTAB:
            batch, prompts, lr, gate_init = TABLE5[task][backbone]
            head = f"backbone: {backbone}\nweights: {weights}\n"
            data = data_block("vtab", task, "/path/to/vtab-1k")
            write(ROOT / "vtab" / backbone / f"{task}.yaml",
                  f"# VTAB-1k {task} with {backbone}, the paper's settings (Table 5): change data.root and weights.\n"
                  + head + ours(backbone, batch, prompts, gate_init) + data
                  + train_block(batch, lr, "Table 5") + f"out: runs/vtab/{task}-{backbone}\n")
            for method in ("vpt-shallow", "vpt-deep"):
                write(ROOT / "vtab" / backbone / method / f"{task}.yaml",
                      f"# VTAB-1k {task} with {backbone}, {method} baseline; prompts: Table 5's count for this task "
                      f"(the paper prints none for VPT).\n"
                      + head + baseline(method, prompts, method == "vpt-deep") + data
                      + train_block(128, 0.1, "placeholder: searched by gapt sweep")
                      + f"out: runs/vtab/{task}-{backbone}-{method}\n")
            for method in HEAD_AND_FULL:
                write(ROOT / "vtab" / backbone / method / f"{task}.yaml",
                      f"# VTAB-1k {task} with {backbone}, {method} baseline.\n" + head + baseline(method, 0, False)
                      + data + train_block(128, 0.1, "placeholder: searched by gapt sweep")
                      + f"out: runs/vtab/{task}-{backbone}-{method}\n")
            for method in PEFT_RECIPES:
                write(ROOT / "vtab" / backbone / method / f"{task}.yaml", peft(backbone, method, "vtab", weights, data, task))
        write(ROOT / "ade20k" / f"{backbone}.yaml", seg_preset(backbone, weights, "gated", TABLE5["ade20k"][backbone][1]))
        for method, n in SEG_BASELINE_PROMPTS.items():
            write(ROOT / "ade20k" / f"{backbone}-{method}.yaml", seg_preset(backbone, weights, method, n))
    import sys  # DA-VPT(+) presets: the authors' per-task configs (scripts/davpt_presets.py, SPEC §12.5(d))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import davpt_presets
    davpt_presets.write_all(ROOT, BACKBONES, list(FGVC), VTAB, data_block, FGVC, write)
    import init_presets  # SPT and VIPAMIN presets (scripts/init_presets.py, SPEC §12.1(d), §12.2(d))
    init_presets.write_all(ROOT, BACKBONES, FGVC, VTAB, data_block, write)
    import vfpt_e2vpt_presets  # VFPT and E2VPT presets (scripts/vfpt_e2vpt_presets.py, SPEC §12.3(d), §12.4(d))
    vfpt_e2vpt_presets.write_all(ROOT, BACKBONES, FGVC, VTAB, data_block, write)


if __name__ == "__main__":
    main()
