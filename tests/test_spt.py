"""prompt_init=spt against a transcription of SPT's own sampler (SPEC §12.1).

The official function below is transcribed from WangYZ1608/Self-Prompt-Tuning @ ce0754f:
``train_MAE.py::prompt_generator`` (``prompt_sample_type="random"``; ``train_MoCo.py::prompt_generator`` is
the same code with ``sample_size=1``) and ``utils.py::_Catcher`` / ``RepCatcher``. Changes, and only these:
``Dataset.__dict__[args.dataset]()`` -> the ``train_data`` argument, ``args.*`` -> keywords, the image side
224 -> the tiny model's 32; the non-random branches are left out. It runs on the tiny model's timm
backbone, whose module names (``patch_embed``, ``blocks.i``) are the ones RepCatcher hooks. It uses the
global RNG after ``torch.manual_seed(seed)``, gapt a generator seeded ``seed``: the same draws, so the
prompts are the same tensors.
"""
import copy

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from conftest import tiny_model
from gapt.engine.prompt_init import init_prompts_spt

M = 3


# -- transcription: utils.py ------------------------------------------------------------------
class _Catcher():
    def __init__(self, model):
        self.model = model
        self.features = {}
        self.hooks = {}

    def _get_hook(self, name):
        def hook(model, input, output):
            self.features[name] = output
        return hook

    def register_model_hooks(self, catch_dic):
        for name, module in self.model.named_modules():
            if name in catch_dic:
                k = catch_dic[name]
                self.features[k] = None
                self.hooks[k] = module.register_forward_hook(self._get_hook(k))

        if not self.hooks.keys() == catch_dic.values():
            print("unfound features: {}".format(catch_dic.values() - self.hooks.keys()))

    def get_features(self, key):
        return self.features[key]


class RepCatcher(_Catcher):
    def __init__(self, model, layers_idx):
        super(RepCatcher, self).__init__(model)
        self.layers_idx = layers_idx
        catch_dic = self._get_rep_catch_dic(layers_idx)
        self.register_model_hooks(catch_dic)

    def _get_rep_catch_dic(self, idx):
        out = {}
        for i in idx:
            if i == 0:
                out["patch_embed"] = "rep{}".format(i)
            else:
                out["blocks.{}".format(i - 1)] = "rep{}".format(i)
        return out

    def get_features(self, idx=None):
        if idx is None:
            idx = self.layers_idx
        return_list = True
        if isinstance(idx, int):
            idx = [idx]
            return_list = False
        reps = []
        for i in idx:
            rep = self.features["rep{}".format(i)]
            if i == 0:
                reps.append(rep)
            else:
                rep = rep[:, 1:, :]   # remove cls token
                reps.append(rep)
        return reps if return_list else reps[0]


# -- transcription: train_MAE.py::prompt_generator (random sampling) ----------------------------
def prompt_generator(model, train_data, num_prompts, prompt_deep, model_depth=12, sample_size=None, size=32):
    if sample_size is None:
        sample_size = len(train_data)

    sample_idx = torch.randint(len(train_data), size=(sample_size, )).numpy().tolist()
    batch_imgs = torch.ones((sample_size, 3, size, size))
    for i in range(sample_size):
        img, label = train_data[sample_idx[i]]
        batch_imgs[i] = img

    model.eval()

    if prompt_deep:
        if not hasattr(model, "depth"):
            model.depth = model_depth

        catcher = RepCatcher(model, list(range(model.depth)))   # for P_L, +1
        with torch.no_grad():
            pred = model(batch_imgs)  # noqa: F841
            x = catcher.get_features()

        prompt = []
        for i in range(model.depth):
            x_ = torch.reshape(x[i], shape=(-1, x[i].shape[-1]))
            L, D = x_.shape
            noise = torch.rand(L, requires_grad=False)   # noise in [0, 1]
            ids_shuffle = torch.argsort(noise, dim=0)
            ids_keep = ids_shuffle[:num_prompts]
            prompt_ = torch.gather(x_, dim=0, index=ids_keep.unsqueeze(-1).repeat(1, D)).numpy()
            prompt.append(prompt_)
        prompt = torch.as_tensor(np.array(prompt))
    else:
        with torch.no_grad():
            x = model.patch_embed(batch_imgs)
        x_ = torch.reshape(x, shape=(-1, x.shape[-1]))
        L, D = x_.shape
        noise = torch.rand(L, requires_grad=False)   # noise in [0, 1]
        ids_shuffle = torch.argsort(noise, dim=0)
        ids_keep = ids_shuffle[:num_prompts]
        # 1, num_prompt, embed_dim
        prompt = torch.gather(x_, dim=0, index=ids_keep.unsqueeze(-1).repeat(1, D)).unsqueeze(0)
    return prompt


def official(model, data, deep, seed, sample_size=None):
    """SPT's generator on a copy of ``model``'s frozen backbone, right after torch.manual_seed(seed)."""
    vit = copy.deepcopy(model.backbone)  # RepCatcher's hooks stay on the copy
    torch.manual_seed(seed)
    return prompt_generator(vit, data, M, deep, model_depth=model.depth, sample_size=sample_size)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randn(20, 3, 32, 32, generator=g), torch.arange(20) % 5)


def close(a, b):
    torch.testing.assert_close(a.detach().float(), b.float(), rtol=1e-5, atol=1e-5)


# -- equal to the official function --------------------------------------------------------------
@pytest.mark.parametrize("method", ["vpt-shallow", "gated"])
def test_shallow_mae_equals_official(method, data):
    model = tiny_model(method=method, num_prompts=M, learn_temperature=method == "gated")
    record = init_prompts_spt(model, data, seed=3, device="cpu")  # MAE: the whole train set, resampled
    close(model.prompt_embeddings, official(model, data, deep=False, seed=3))
    assert record["images"] == 20 and len(record["image_indices"]) == 20
    torch.manual_seed(3)  # the same draw, read back: which images and which patch of each
    assert record["image_indices"] == torch.randint(20, (20,)).tolist()


def test_deep_mae_equals_official(data):
    model = tiny_model(method="vpt-deep", num_prompts=M)
    init_prompts_spt(model, data, seed=5, device="cpu", batch_size=6)  # streamed in chunks of 6
    expected = official(model, data, deep=True, seed=5)
    assert expected.shape == (model.depth, M, model.embed_dim)
    close(model.prompt_embeddings[0], expected[0])
    close(model.deep_prompt_embeddings, expected[1:])


@pytest.mark.parametrize("deep", [False, True])
def test_moco_samples_one_image_as_train_moco(deep, data):
    model = tiny_model("test_moco_tiny", method="vpt-deep" if deep else "vpt-shallow", num_prompts=M)
    record = init_prompts_spt(model, data, seed=11, device="cpu")  # spt_images=0: MoCo v3's one image
    expected = official(model, data, deep=deep, seed=11, sample_size=1)  # train_MoCo.py: sample_size=1
    close(model.prompt_embeddings[0], expected[0])
    if deep:
        close(model.deep_prompt_embeddings, expected[1:])
    assert record["images"] == 1 and {i for b in record["blocks"].values() for i, _ in b["tokens"]} == \
        set(record["image_indices"])


def test_spt_images_sets_the_sample_size(data):
    model = tiny_model(method="vpt-shallow", num_prompts=M)
    record = init_prompts_spt(model, data, seed=2, num_images=7)
    close(model.prompt_embeddings, official(model, data, deep=False, seed=2, sample_size=7))
    assert record["images"] == 7


# -- where gapt goes beyond the official code: the property ----------------------------------------
def test_at_block_prompts_are_rows_of_that_block_input(data):
    model = tiny_model(method="vpt-at-block", insert_at_block=3, num_prompts=M)
    record = init_prompts_spt(model, data, seed=4)
    vit = copy.deepcopy(model.backbone)
    catcher = RepCatcher(vit, [2])  # rep2: blocks.1's output without CLS = the input of block 3
    idx = record["image_indices"]
    with torch.no_grad():
        vit(data.tensors[0][idx])
    tokens = catcher.get_features(2)
    for p, (image, patch) in zip(model.prompt_embeddings[0].detach(), record["blocks"]["3"]["tokens"]):
        close(p, tokens[idx.index(image), patch])


def test_lora_composition_uses_the_step0_model(data):
    model = tiny_model(method="vpt-deep+lora", num_prompts=M)  # LoRA's B = 0: the frozen blocks' function
    init_prompts_spt(model, data, seed=5)
    from gapt.model.parts import strip
    plain = copy.deepcopy(model)
    strip(plain.backbone)
    expected = official(plain, data, deep=True, seed=5)
    close(model.prompt_embeddings[0], expected[0])
    close(model.deep_prompt_embeddings, expected[1:])


# -- randomness, errors --------------------------------------------------------------------------
class Flipping(Dataset):
    """A training transform that draws from torch's RNG (FGVC's random flip)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        flip = torch.rand(()) < 0.5
        return (self.images[i].flip(-1) if flip else self.images[i]), 0


def test_seeded_augmentation_and_global_rng_untouched(data):
    flipping = Flipping(data.tensors[0])
    a, b, c = (tiny_model(method="vpt-deep", num_prompts=M) for _ in range(3))
    state = torch.get_rng_state()
    init_prompts_spt(a, flipping, seed=8, batch_size=4)
    assert torch.equal(torch.get_rng_state(), state)
    init_prompts_spt(b, flipping, seed=8, batch_size=16)  # other chunks: the same augmentation stream
    init_prompts_spt(c, flipping, seed=9)
    close(a.deep_prompt_embeddings, b.deep_prompt_embeddings)
    assert not torch.equal(a.prompt_embeddings, c.prompt_embeddings)


def test_errors(data):
    with pytest.raises(ValueError, match="linear"):
        init_prompts_spt(tiny_model(method="linear"), data)
    model = tiny_model("test_moco_tiny", method="vpt-shallow", num_prompts=20)  # 1 image = 16 tokens < 20
    with pytest.raises(ValueError, match="spt_images"):
        init_prompts_spt(model, data)
