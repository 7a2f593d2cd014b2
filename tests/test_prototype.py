"""prompt_init=prototype: prompts = k-means centres of the training set's token features at the
insertion block, checked against a k-means written out here and against the k-means fixed point."""
import pytest
import torch
from torch.utils.data import TensorDataset

from conftest import tiny_model
from gapt.engine.prototype import init_prompts_from_prototypes, kmeans, lloyd

NUM_IMAGES = 12  # of 20; each 32x32 image gives 16 patch tokens -> 192 points


@pytest.fixture
def dataset():
    g = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randn(20, 3, 32, 32, generator=g), torch.arange(20) % 5)


# -- an independent k-means: the rule the module documents, written out plainly ------------------
def hand_kmeans(points, k, g, iters):
    """k-means++ (first centre randint, then multinomial on the squared distance to the nearest
    chosen centre) followed by Lloyd steps until the assignment stops changing."""
    n = points.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=g))]
    for _ in range(1, k):
        d2 = torch.stack([((points - points[c]) ** 2).sum(1) for c in chosen]).min(0).values
        chosen.append(int(torch.multinomial(d2.double(), 1, generator=g)))
    centres = points[chosen].clone()
    labels = None
    for _ in range(iters):
        new = torch.cdist(points.double(), centres.double()).argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            if (labels == j).any():
                centres[j] = points[labels == j].mean(0)
    return centres


def sample(dataset, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:NUM_IMAGES]
    return dataset.tensors[0][idx], g


def patch_tokens_entering(model, images, block):
    """Patch tokens entering 1-based ``block`` of the frozen, prompt-free backbone."""
    with torch.no_grad():
        x = model.embed(images)
        for i in range(block - 1):
            x = model.backbone.blocks[i](x)
    return x[:, 1:].reshape(-1, model.embed_dim)


@pytest.mark.parametrize("method", ["vpt-shallow", "gated"])
def test_prompts_equal_hand_kmeans_of_embedded_tokens(method, dataset):
    model = tiny_model(method=method, num_prompts=3)
    init_prompts_from_prototypes(model, dataset, seed=5, device="cpu", num_images=NUM_IMAGES, iters=50)
    images, g = sample(dataset, 5)
    expected = hand_kmeans(patch_tokens_entering(model, images, 1), 3, g, 50)
    torch.testing.assert_close(model.prompt_embeddings[0].detach(), expected, atol=1e-5, rtol=1e-5)


def test_at_block_uses_tokens_entering_block_k(dataset):
    model = tiny_model(method="vpt-at-block", insert_at_block=3, num_prompts=4)
    init_prompts_from_prototypes(model, dataset, seed=1, device="cpu", num_images=NUM_IMAGES)
    images, g = sample(dataset, 1)
    expected = hand_kmeans(patch_tokens_entering(model, images, 3), 4, g, 50)
    torch.testing.assert_close(model.prompt_embeddings[0].detach(), expected, atol=1e-5, rtol=1e-5)


def test_deep_prompts_from_each_block_input(dataset):
    model = tiny_model(method="vpt-deep", num_prompts=2)
    init_prompts_from_prototypes(model, dataset, seed=3, device="cpu", num_images=NUM_IMAGES, iters=10)
    images, g = sample(dataset, 3)  # one generator: block 1's k-means++ draws, then blocks 2..L in order
    torch.testing.assert_close(model.prompt_embeddings[0].detach(),
                               hand_kmeans(patch_tokens_entering(model, images, 1), 2, g, 10), atol=1e-5, rtol=1e-5)
    for block in range(2, model.depth + 1):
        torch.testing.assert_close(model.deep_prompt_embeddings[block - 2].detach(),
                                   hand_kmeans(patch_tokens_entering(model, images, block), 2, g, 10),
                                   atol=1e-5, rtol=1e-5)


def test_centres_are_a_kmeans_fixed_point(dataset):
    model = tiny_model(method="gated", num_prompts=4)
    init_prompts_from_prototypes(model, dataset, seed=0, device="cpu", num_images=NUM_IMAGES, iters=200)
    images, _ = sample(dataset, 0)
    points = patch_tokens_entering(model, images, 1)
    centres = model.prompt_embeddings[0].detach()
    labels = torch.cdist(points.double(), centres.double()).argmin(1)  # nearest-centre assignment
    for j in range(4):
        assert (labels == j).any(), "a prototype without points"
        torch.testing.assert_close(centres[j], points[labels == j].mean(0), atol=1e-5, rtol=1e-5)


def test_lloyd_matches_hand_steps_from_same_start():
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(30, 5, generator=g) + 4 * i for i in range(3)])
    start = points[[0, 1, 2]].clone()  # a poor start: all three in one blob
    centres, labels, steps = lloyd(points, start, iters=3)
    ref = start.clone()
    for _ in range(3):
        lab = torch.cdist(points, ref).argmin(1)
        ref = torch.stack([points[lab == j].mean(0) if (lab == j).any() else ref[j] for j in range(3)])
    torch.testing.assert_close(centres, ref)
    assert steps <= 3 and labels.shape == (90,)
    # run to convergence: every blob gets one centre
    full = kmeans(points, 3, iters=100, seed=1)
    blob_means = torch.stack([points[30 * i:30 * (i + 1)].mean(0) for i in range(3)])
    order = torch.cdist(blob_means, full).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(full[order], blob_means, atol=1e-5, rtol=1e-5)


def test_seeded_and_leaves_global_rng_alone(dataset):
    a, b, c = (tiny_model(method="gated", num_prompts=3) for _ in range(3))
    state = torch.get_rng_state()
    init_prompts_from_prototypes(a, dataset, seed=11, num_images=NUM_IMAGES)
    assert torch.equal(torch.get_rng_state(), state)
    init_prompts_from_prototypes(b, dataset, seed=11, num_images=NUM_IMAGES)
    init_prompts_from_prototypes(c, dataset, seed=12, num_images=NUM_IMAGES)
    assert torch.equal(a.prompt_embeddings, b.prompt_embeddings)
    assert not torch.equal(a.prompt_embeddings, c.prompt_embeddings)


@pytest.mark.parametrize("method", ["linear", "full"])
def test_methods_without_prompts_are_an_error(method, dataset):
    model = tiny_model(method=method)
    with pytest.raises(ValueError, match=method):
        init_prompts_from_prototypes(model, dataset, seed=0)


def test_too_few_points_is_an_error(dataset):
    model = tiny_model(method="gated", num_prompts=40)
    with pytest.raises(ValueError, match="num_prompts=40"):
        init_prompts_from_prototypes(model, dataset, seed=0, num_images=2)  # 32 points < 40


SMALL_RUN = ("backbone=test_mae_tiny weights=null image_size=32 num_prompts=2 train.epochs=1 train.warmup_epochs=0 "
             "train.batch_size=32 data.num_workers=0 device=cpu data.format=shapes data.name=count "
             "data.num_samples=64").split()


def test_trainer_runs_prototype_init(tmp_path):
    from gapt.config import load_config
    from gapt.engine.trainer import train
    from gapt.paper.published import method_key

    seen = {}

    def initialiser(model, train_set, seed, device):
        seen["seed"], seen["n"] = seed, len(train_set)
        out = init_prompts_from_prototypes(model, train_set, seed=seed, device=device)
        seen["prompts"] = model.prompt_embeddings.detach().clone()
        return out

    cfg = load_config(None, SMALL_RUN + ["method=vpt-deep", "prompt_init=prototype", f"out={tmp_path / 'run'}"])
    results = train(cfg, prompt_initialiser=initialiser)
    assert seen["seed"] == 42 and seen["n"] == 64
    assert results["prompt_init"] == "prototype"
    assert method_key(results["method"], results["learn_temperature"], results["prompt_init"]) == "vpt-deep+prototype"

    from gapt.config import ConfigError
    with pytest.raises(ConfigError, match="'prompt_init'.*linear"):  # refused with the config, before any work
        load_config(None, SMALL_RUN + ["method=linear", "prompt_init=prototype", f"out={tmp_path / 'lin'}"])
    assert not (tmp_path / "lin").exists()
