"""Write the preset configs under gapt/configs/ (SPEC §6 settings); rerun after changing them.

    python scripts/make_presets.py
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

COMMON = """\
method: gated             # gated prompt tuning (GaPT)
learn_temperature: true   # + adaptive attention shaping
gate_init: 10.0           # gates start at sigmoid(-10); the paper tunes it in 1..20
prompt_dropout: 0.1
image_size: 224
"""


def train_block(batch: int) -> str:
    return f"""train:
  epochs: 100
  warmup_epochs: 10
  batch_size: {batch}
  lr: 0.1                 # gapt sweep searches SPEC §6's grid on val
  weight_decay: 0.0
  optimizer: sgd
  momentum: 0.9
  schedule: cosine
  seed: 42
"""


def main():
    for backbone, weights in BACKBONES.items():
        for name, folder in FGVC.items():
            text = (f"# FGVC {name} with {backbone}: change data.root and weights, nothing else.\n"
                    f"backbone: {backbone}\nweights: {weights}\n{COMMON}num_prompts: 100\n"
                    f"data:\n  format: fgvc\n  name: {name}\n  root: /path/to/{folder}\n"
                    f"{train_block(64)}out: runs/fgvc/{name}-{backbone}\n")
            path = ROOT / "fgvc" / backbone / f"{name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        for task in VTAB:
            text = (f"# VTAB-1k {task} with {backbone}: change data.root and weights, nothing else.\n"
                    f"backbone: {backbone}\nweights: {weights}\n{COMMON}"
                    f"num_prompts: 100           # the paper sweeps 1..100 per task (gapt sweep num_prompts=1,5,10,50,100)\n"
                    f"data:\n  format: vtab\n  name: {task}\n  root: /path/to/vtab-1k\n"
                    f"{train_block(128)}out: runs/vtab/{task}-{backbone}\n")
            path = ROOT / "vtab" / backbone / f"{task}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


if __name__ == "__main__":
    main()
