"""DA-VPT+ and DA-VPT presets (SPEC §12.5(d)), written by scripts/make_presets.py:

    gapt/configs/{fgvc,vtab}/<backbone>/da-vpt-plus/<task>.yaml   method da-vpt+davpt-bias (DA-VPT+)
    gapt/configs/{fgvc,vtab}/<backbone>/da-vpt/<task>.yaml        method da-vpt (plain DA-VPT)

``CONFIGS`` is Noahsark/DA-VPT @ 1a5ac60 ``configs/{fgvc,vtab}/{mae,moco}_<task>.yaml`` transcribed
(every key that ``params.py`` reads; the configs' other keys are ignored by the authors' code too).
Every released config is a DA-VPT+ config (SPEC §12.5(c)): plain DA-VPT gets the same settings with
every "+" tensor off, as SPEC says it must be run (no plain config is released; its lr is the "+" one's).
No config is released for sun397, svhn and kitti, MAE oxford_iiit_pet and MoCo v3 diabetic_retinopathy:
those presets take a named sibling task's settings and are marked as needing the lr sweep
(``gapt sweep --grid davpt``).
"""
from typing import Dict, Tuple

# (benchmark, backbone, task) -> (lr, weight_decay, wd_head, num_prompts, proxy_prompt_len, first proxy block,
#  last proxy block (1-based: proxy_prompt_start_idx / end_idx + 1), vpt_norm, init_divide_by8, vpt_loss_weight,
#  cls_loss_weight, loss_vpt_scale_ratio, mask, drop_path, dynamic_kmeans, cls_type, extra "+" tensors
#  (bias_k, bias_q, norm_norm1, train_cls), eval_after)
CONFIGS: Dict[Tuple[str, str, str], tuple] = {
    ("fgvc", "mae_vitb16", "nabirds"): (0.005, 0.01, 0.5, 10, 20, 9, 12, "none", False, 0.05, 0.05, 5.0, True, 0.0, 1, "query", "", 80),
    ("fgvc", "mae_vitb16", "cars"): (0.005, 0.05, 0.1, 15, 15, 5, 12, "none", False, 0.01, 0.5, 5.0, True, 0.0, 1, "query", "", 60),
    ("fgvc", "mae_vitb16", "cub"): (0.005, 0.01, 0.5, 15, 20, 10, 12, "l2", False, 0.05, 0.05, 5.0, True, 0.0, 1, "query", "", 80),
    ("fgvc", "mae_vitb16", "dogs"): (0.001, 0.0001, 0.05, 20, 10, 12, 12, "l2", True, 0.01, 0.03, 0.0, False, 0.0, 10, "query", "cls_token", 80),
    ("fgvc", "mae_vitb16", "flowers"): (0.005, 0.0001, 0.5, 5, 40, 6, 12, "none", False, 0.01, 0.1, 5.0, True, 0.0, 1, "query", "", 80),
    ("fgvc", "mocov3_vitb16", "nabirds"): (0.01, 0.01, 0.05, 20, 20, 12, 12, "none", True, 0.01, 0.05, 5.0, False, 0.0, 10, "query", "k.bias,norm1,cls_token", 80),
    ("fgvc", "mocov3_vitb16", "cars"): (0.005, 0.5, 0.0001, 10, 20, 11, 12, "none", True, 0.05, 0.05, 5.0, False, 0.0, 10, "query", "k.bias,norm1", 80),
    ("fgvc", "mocov3_vitb16", "cub"): (0.005, 1.0, 0.1, 40, 20, 12, 12, "l2", True, 0.1, 0.02, 1.0, False, 0.1, 1, "query", "k.bias,norm1,cls_token", 80),
    ("fgvc", "mocov3_vitb16", "dogs"): (0.005, 0.0001, 0.05, 5, 10, 12, 12, "none", True, 0.01, 0.03, 5.0, False, 0.0, 10, "query", "k.bias,norm1,cls_token", 80),
    ("fgvc", "mocov3_vitb16", "flowers"): (0.01, 1.0, 0.05, 5, 10, 4, 12, "none", True, 0.05, 0.05, 10.0, True, 0.0, 10, "query", "k.bias,norm1,cls_token", 80),
    ("vtab", "mae_vitb16", "caltech101"): (0.005, 0.05, 0.5, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "cls_token", 80),
    ("vtab", "mae_vitb16", "patch_camelyon"): (0.0001, 0.5, 0.5, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "cls_token", 80),
    ("vtab", "mae_vitb16", "cifar"): (0.001, 5.0, 0.5, 0, 10, 6, 12, "none", True, 0.01, 0.1, 5.0, False, 0.1, 1, "query", "norm1,cls_token", 80),
    ("vtab", "mae_vitb16", "clevr_count"): (0.001, 0.5, 0.001, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "cls_token", 80),
    ("vtab", "mae_vitb16", "clevr_dist"): (0.001, 10.0, 0.5, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "cls_token", 80),
    ("vtab", "mae_vitb16", "dmlab"): (0.001, 0.5, 0.0001, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "cls_token", 80),
    ("vtab", "mae_vitb16", "dsprites_loc"): (0.001, 10.0, 10.0, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "cls_token", 80),
    ("vtab", "mae_vitb16", "dsprites_ori"): (0.001, 1.0, 0.0, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "cls_token", 80),
    ("vtab", "mae_vitb16", "dtd"): (0.001, 0.5, 0.5, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "cls_token", 80),
    ("vtab", "mae_vitb16", "eurosat"): (0.0005, 5.0, 0.5, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "cls_token", 80),
    ("vtab", "mae_vitb16", "oxford_flowers102"): (0.005, 0.5, 0.5, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "cls_token", 80),
    ("vtab", "mae_vitb16", "resisc45"): (0.005, 0.05, 0.005, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "cls_token", 80),
    ("vtab", "mae_vitb16", "diabetic_retinopathy"): (0.005, 0.001, 0.01, 0, 10, 12, 12, "none", True, 0.01, 0.03, 5.0, False, 0.1, 1, "query", "norm1,cls_token", 60),
    ("vtab", "mae_vitb16", "smallnorb_azi"): (0.001, 1.0, 0.0005, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "cls_token", 80),
    ("vtab", "mae_vitb16", "smallnorb_ele"): (0.0001, 5.0, 0.1, 10, 10, 12, 12, "none", True, 0.05, 0.5, 5.0, False, 0.1, 1, "query", "norm1,cls_token", 60),
    ("vtab", "mocov3_vitb16", "caltech101"): (0.01, 0.0005, 0.1, 0, 5, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 1, "query", "norm1,cls_token", 80),
    ("vtab", "mocov3_vitb16", "patch_camelyon"): (0.0001, 5.0, 0.0005, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "k.bias,norm1,cls_token", 80),
    ("vtab", "mocov3_vitb16", "cifar"): (0.005, 5.0, 0.05, 0, 5, 3, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 1, "query", "norm1,cls_token", 80),
    ("vtab", "mocov3_vitb16", "clevr_count"): (0.001, 0.1, 0.0, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "k.bias,norm1,cls_token", 80),
    ("vtab", "mocov3_vitb16", "clevr_dist"): (0.0001, 0.01, 0.0001, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "k.bias,norm1,cls_token", 80),
    ("vtab", "mocov3_vitb16", "dmlab"): (0.005, 0.005, 0.005, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "k.bias,norm1,cls_token", 80),
    ("vtab", "mocov3_vitb16", "dsprites_loc"): (0.0005, 10.0, 10.0, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "k.bias,norm1,cls_token", 80),
    ("vtab", "mocov3_vitb16", "dsprites_ori"): (0.001, 10.0, 0.01, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "k.bias,norm1,cls_token", 80),
    ("vtab", "mocov3_vitb16", "dtd"): (0.005, 0.001, 0.05, 0, 10, 12, 12, "none", True, 0.05, 0.03, 5.0, False, 0.2, 1, "query", "norm1,cls_token", 80),
    ("vtab", "mocov3_vitb16", "eurosat"): (0.001, 0.5, 0.0, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "k.bias,norm1,cls_token", 80),
    ("vtab", "mocov3_vitb16", "oxford_flowers102"): (0.005, 0.0, 0.0001, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "k.bias,norm1,cls_token", 80),
    ("vtab", "mocov3_vitb16", "oxford_iiit_pet"): (0.005, 0.01, 0.05, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "k.bias,norm1,cls_token", 80),
    ("vtab", "mocov3_vitb16", "resisc45"): (0.005, 0.001, 0.0001, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "k.bias,norm1,cls_token", 80),
    ("vtab", "mocov3_vitb16", "smallnorb_azi"): (0.005, 0.05, 0.001, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "k.bias,norm1,cls_token", 80),
    ("vtab", "mocov3_vitb16", "smallnorb_ele"): (0.0005, 0.5, 0.0005, 5, 10, 12, 12, "none", True, 0.01, 0.01, 5.0, False, 0.1, 10, "query", "k.bias,norm1,cls_token", 80),
}
# Tasks without a released config -> the sibling task whose settings they take (and the lr sweep).
SIBLINGS = {"sun397": "caltech101", "svhn": "cifar", "kitti": "clevr_dist", "oxford_iiit_pet": "oxford_flowers102",
            "diabetic_retinopathy": "patch_camelyon"}
AUTHORS_FILE = {"nabirds": "birds", "cub": "cub200", "patch_camelyon": "camelyon", "cifar": "cifar100",
                "clevr_count": "clerv_count", "dsprites_loc": "dspr_loc", "dsprites_ori": "dspr_ori",
                "oxford_flowers102": "flower102", "oxford_iiit_pet": "pets", "diabetic_retinopathy": "retinopathy"}
PLUS_BASE = "v.bias,proj.bias,fc2.bias,norm2.bias"
NOT_CARRIED = ("# Not carried over (gapt has no such option; README, DA-VPT): fp16 AMP (fp32 here), the class-balanced\n"
               "# sampler (2 images per class; random batches here), warm-up from 1e-8 and the floor 1e-9 (0 here),\n"
               "# and the protocol: the authors report the best test epoch from epoch {after} on, gapt the last epoch.\n")


def settings_of(benchmark: str, backbone: str, task: str):
    """(the config's settings, the task it comes from): its own, or a sibling's where none is released."""
    if (benchmark, backbone, task) in CONFIGS:
        return CONFIGS[(benchmark, backbone, task)], task
    sibling = SIBLINGS[task]
    return CONFIGS[(benchmark, backbone, sibling)], sibling


def preset(benchmark: str, backbone: str, task: str, weights: str, data: str, plus: bool) -> str:
    """One preset's text (DA-VPT+ when ``plus``, else plain DA-VPT)."""
    (lr, wd, wd_head, n_other, p_len, first, last, norm, div8, w_patch, w_cls, tau, mask, drop_path, dynamic,
     cls_type, extra, after), source = settings_of(benchmark, backbone, task)
    mn = {"mae_vitb16": "mae", "mocov3_vitb16": "moco"}[backbone]
    origin = f"configs/{benchmark}/{mn}_{AUTHORS_FILE.get(source, source)}.yaml"
    name = "DA-VPT+" if plus else "DA-VPT"
    lines = [f"# {'FGVC' if benchmark == 'fgvc' else 'VTAB-1k'} {task} with {backbone}, {name} (SPEC §12.5): the settings of "
             f"Noahsark/DA-VPT's {origin}."]
    if source != task:
        lines.append(f"# NO RELEASED CONFIG for {task}: {source}'s settings. NEEDS THE LR SWEEP:\n"
                     f"#   gapt sweep --config <this file> --grid davpt weights=... data.root=...")
    if not plus:
        lines.append("# Plain DA-VPT: every released config is a DA-VPT+ config; this one turns every '+' tensor off "
                     "(SPEC §12.5(c)),\n# keeping the rest (the paper gives no separate DA-VPT settings).")
    lines.append("# Recipe: AdamW, gradients clipped to [-10, 10], batch 32, 100 epochs (10 warm-up), cosine per step;"
                 " prompts decay at\n# weight_decay, the head's weight at wd_head, biases and 1-D tensors not at all.")
    text = "\n".join(lines) + "\n" + NOT_CARRIED.format(after=after)
    text += f"backbone: {backbone}\nweights: {weights}\n"
    text += f"method: {'da-vpt+davpt-bias' if plus else 'da-vpt'}\n"
    if plus:
        tensors = ",".join(t for t in (PLUS_BASE, extra) if t)
        text += f"davpt_bias_tensors: {tensors}   # bias_v, bias_proj, bias_fc2, bias_norm2 (+ bias_k, norm_norm1, train_cls)\n"
    text += (f"num_prompts: {n_other}             # the other blocks' prompts (num_prompts)\n"
             f"davpt_proxy_len: {p_len}\ndavpt_proxy_first: {first}\ndavpt_proxy_last: {last}\n"
             f"davpt_prompt_norm: {norm}\ndavpt_init_div8: {str(div8).lower()}\n"
             f"davpt_patch_weight: {w_patch:g}\ndavpt_cls_weight: {w_cls:g}\ndavpt_cls_type: {cls_type}\n"
             f"davpt_scale: {tau:g}\ndavpt_mask: {str(mask).lower()}\ndavpt_drop_path: {drop_path:g}\n"
             f"davpt_samples_per_class: 10\ndavpt_dynamic_kmeans: {dynamic}\n"
             f"prompt_dropout: 0.0           # prompt_drop_rate: no config sets it\n"
             f"pooling: {'mean_normed' if mn == 'mae' else 'cls'}{' ' * (10 if mn == 'mae' else 18)}"
             f"# {'norm, then the mean of every token but CLS (prompts included)' if mn == 'mae' else 'norm(x)[:, 0]'}\n"
             f"image_size: 224\n")
    text += data
    text += (f"train:\n  epochs: 100\n  warmup_epochs: auto       # 10 at 100 epochs\n  batch_size: 32\n"
             f"  lr: {lr:g}{' ' * max(1, 22 - len(f'{lr:g}'))}# {'placeholder: searched by gapt sweep' if source != task else 'the config'}\n"
             f"  weight_decay: {wd:g}\n  head_weight_decay: {wd_head:g}    # wd_head\n  head_bias_decay: false\n"
             f"  optimizer: adamw\n  clip_grad_value: 10.0\n  schedule: cosine\n  seed: 42\n"
             f"  precision: fp32           # the authors ran fp16 AMP\n")
    return text + f"out: runs/{benchmark}/{task}-{backbone}-{'da-vpt-plus' if plus else 'da-vpt'}\n"


def write_all(root, backbones, fgvc_tasks, vtab_tasks, data_block, fgvc_folders, write) -> None:
    """Every DA-VPT(+) preset, through make_presets' ``data_block`` and ``write``."""
    for backbone, weights in backbones.items():
        for benchmark, tasks in (("fgvc", fgvc_tasks), ("vtab", vtab_tasks)):
            for task in tasks:
                root_dir = f"/path/to/{fgvc_folders[task]}" if benchmark == "fgvc" else "/path/to/vtab-1k"
                data = data_block(benchmark, task, root_dir)
                for plus, folder in ((True, "da-vpt-plus"), (False, "da-vpt")):
                    write(root / benchmark / backbone / folder / f"{task}.yaml",
                          preset(benchmark, backbone, task, weights, data, plus))
