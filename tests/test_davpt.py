"""DA-VPT and DA-VPT+ (SPEC §12.5) against a transcription of the authors' code, Noahsark/DA-VPT @ 1a5ac60:

- ``AuthorsCriterion``: models/criterion.py::VPTCriterion (fast_selection, ml_patch_forward, ml_cls_forward,
  masked_logsumexp, _map_label_values), written out again here line by line;
- ``AuthorsViT``: models/vpt.py::PromptVisionTransformer.forward_features / forward, VPTBlock.forward,
  models/attn.py::VPTAttention (separate q / k / v Linears copied from timm's qkv: _separate_qkv_params;
  _generate_mask);
- ``authors_cosine_kmeans``: model_creator.py::cosine_kmeans; ``authors_frozen_features``:
  models/vit.py::VisionTransformer.forward_features (the frozen copy of the init pass).

gapt's part is compared with these (loss value, gradients, logits), never with itself.
"""
import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from gapt.config import ConfigError, load_config
from gapt.model import PromptedViT
from gapt.model.parts.davpt import xavier_prompts
from gapt.model.parts.davpt_bias import authors_name, load_authors_state
from gapt.model.parts.davpt_loss import cosine_kmeans, proxy_anchor_loss

D, DEPTH, C = 32, 4, 6


# -- the transcription ------------------------------------------------------------------------------
class Args:
    """The argparse namespace the authors' modules read (params.py names)."""

    def __init__(self, **kw):
        self.proxy_prompt_len, self.num_classes, self.initial_mapping, self.criterion = 4, C, "kmeans", "proxyanchor"
        self.loss_oproxy_pos_alpha = self.loss_oproxy_neg_alpha = 32.0
        self.loss_oproxy_pos_delta, self.loss_oproxy_neg_delta = 0.1, -0.1
        self.loss_vpt_scale_ratio, self.vpt_loss_weight, self.cls_loss_weight = 5.0, 0.05, 0.1
        self.patch_type, self.vpt_type_for_patch_ml, self.vpt_type_for_cls_ml, self.cls_type = "output", "vpt", "vpt", "query"
        self.test_vpt_loss_off = self.test_cls_loss_off = False
        self.__dict__.update(kw)


class AuthorsCriterion(nn.Module):
    """models/criterion.py::VPTCriterion, the proxy-anchor path (proxy_dim 0), cuda -> the inputs' device."""

    def __init__(self, args, mapping):
        super().__init__()
        self.args, self.num_proxies, self.embed_dim = args, args.proxy_prompt_len, D
        self.mapping = mapping.cpu().tolist()
        self.class_idxs = torch.arange(self.num_proxies)
        if args.initial_mapping == "all_classes":
            self.class_idxs = torch.arange(args.num_classes)
        self.proxy_dim = 0

    def forward(self, batch, vpt, labels, attn, output):
        labels = labels.long().view(-1)
        xs, ps, cls, labels = self.fast_selection(batch, vpt, attn, labels, output)
        patch_loss = self.ml_patch_forward(xs, ps, labels)
        cls_loss = self.ml_cls_forward(cls, ps, labels)
        return self.args.vpt_loss_weight * patch_loss + self.args.cls_loss_weight * cls_loss

    def fast_selection(self, batch, vpt, attn, labels, output):
        B, N, dim = batch.size()
        query, key = attn._q, attn._k
        query_vpt = query[:, 1:(self.num_proxies + 1), :].mean(dim=0, keepdim=True)
        key_vpt = key[:, 1:(self.num_proxies + 1), :].mean(dim=0, keepdim=True)
        out_vpt = output[:, 0, :].unsqueeze(0)
        cls, query_cls, key_cls = batch[:, 0, :], query[:, 0, :], key[:, 0, :]
        patch = batch[:, (1 + self.num_proxies):, :].mean(dim=1, keepdim=False)
        query_patch = query[:, (1 + self.num_proxies):, :].mean(dim=1, keepdim=False)
        key_patch = key[:, (1 + self.num_proxies):, :].mean(dim=1, keepdim=False)
        out_patch = output[:, 1:(self.num_proxies + 1), :]
        labels = self._map_label_values(labels, self.mapping).to(batch.device)
        out_patch = torch.gather(out_patch, dim=1, index=labels.unsqueeze(1).unsqueeze(1).expand(-1, 1, dim))
        out_patch = out_patch.squeeze(1)
        return (patch, query_patch, key_patch, out_patch), (vpt, query_vpt, key_vpt, out_vpt), \
            (cls, query_cls, key_cls), labels

    def _map_label_values(self, labels, mapping):
        mapped_labels = labels.clone()
        for i in range(len(mapping)):
            mapped_labels[labels == i] = mapping[i]
        return mapped_labels

    def ml_cls_forward(self, clses, vpts, labels):
        cls = {"cls": clses[0], "query": clses[1], "key": clses[2]}[self.args.cls_type]
        vpt = vpts[0]
        device = cls.device
        cls_batch = F.normalize(cls, dim=-1)
        proxies = F.normalize(vpt.squeeze(0), dim=-1) * self.args.loss_vpt_scale_ratio
        self.labels = labels.unsqueeze(1)
        self.class_idxs = self.class_idxs.to(device)
        self.same_labels = (self.class_idxs.unsqueeze(1) == self.labels.T).to(device).T
        self.diff_labels = (self.class_idxs.unsqueeze(1) != self.labels.T).to(device).T
        sims = cls_batch.mm(proxies.T)
        w_pos_sims = -self.args.loss_oproxy_pos_alpha * (sims - self.args.loss_oproxy_pos_delta)
        w_neg_sims = self.args.loss_oproxy_neg_alpha * (sims - self.args.loss_oproxy_neg_delta)
        pos_s = self.masked_logsumexp(w_pos_sims, mask=self.same_labels.type(torch.bool), dim=self.proxy_dim)
        neg_s = self.masked_logsumexp(w_neg_sims, mask=self.diff_labels.type(torch.bool), dim=self.proxy_dim)
        return pos_s.mean() + neg_s.mean()

    def ml_patch_forward(self, patchs, vpts, labels):
        vpt = vpts[0]
        batch = F.normalize(patchs[0], dim=-1)  # patch_type is ignored: patchs[0] always
        proxies = F.normalize(vpt.squeeze(0), dim=-1) * self.args.loss_vpt_scale_ratio
        self.labels = labels.unsqueeze(1)
        self.class_idxs = self.class_idxs.to(batch.device)
        self.same_labels = (self.class_idxs.unsqueeze(1) == self.labels.T).to(batch.device).T
        self.diff_labels = (self.class_idxs.unsqueeze(1) != self.labels.T).to(batch.device).T
        sims = batch.mm(proxies.T)
        w_pos_sims = -self.args.loss_oproxy_pos_alpha * (sims - self.args.loss_oproxy_pos_delta)
        w_neg_sims = self.args.loss_oproxy_neg_alpha * (sims - self.args.loss_oproxy_neg_delta)
        pos_s = self.masked_logsumexp(w_pos_sims, mask=self.same_labels.type(torch.bool), dim=self.proxy_dim)
        neg_s = self.masked_logsumexp(w_neg_sims, mask=self.diff_labels.type(torch.bool), dim=self.proxy_dim)
        return pos_s.mean() + neg_s.mean()

    def masked_logsumexp(self, sims, dim=0, mask=None):
        if mask is not None:
            sims = sims.masked_fill(~mask, torch.finfo(sims.dtype).min)
        dims = list(sims.shape)
        dims[dim] = 1
        zeros = torch.zeros(dims, dtype=sims.dtype, device=sims.device)
        sims = torch.cat([sims, zeros], dim=dim)
        logsumexp_sims = torch.logsumexp(sims, dim=dim, keepdim=True)
        if mask is not None:
            logsumexp_sims = logsumexp_sims.masked_fill(~torch.any(mask, dim=dim, keepdim=True), 0)
        return logsumexp_sims


class AuthorsAttention(nn.Module):
    """models/attn.py::VPTAttention (flash_attn path) after _separate_qkv_params."""

    def __init__(self, timm_attn, mask, prompt_len, num_img_tokens):
        super().__init__()
        self.num_heads = timm_attn.num_heads
        self.head_dim = D // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        with torch.no_grad():
            for j, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.copy_(timm_attn.qkv.weight[j * D:(j + 1) * D])
                lin.bias.copy_(timm_attn.qkv.bias[j * D:(j + 1) * D])
        self.proj = copy.deepcopy(timm_attn.proj)
        self.mask = None
        if mask:  # _generate_mask
            total_len = num_img_tokens + prompt_len + 1
            self.mask = torch.zeros(total_len, total_len)
            self.mask[1:(1 + prompt_len), 0:(1 + prompt_len)] = -float("inf")

    def forward(self, x):
        B, N, Cc = x.shape
        self._q, self._k, self._v = self.q(x), self.k(x), self.v(x)
        q = self._q.reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        k = self._k.reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        v = self._v.reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale, attn_mask=self.mask)
        x = x.transpose(1, 2).reshape(B, N, Cc)
        attn_out = x
        x = self.proj(x)
        return x, attn_out


class AuthorsBlock(nn.Module):
    def __init__(self, timm_block, mask, prompt_len, num_img_tokens):
        super().__init__()
        self.norm1, self.norm2 = copy.deepcopy(timm_block.norm1), copy.deepcopy(timm_block.norm2)
        self.attn = AuthorsAttention(timm_block.attn, mask, prompt_len, num_img_tokens)
        self.mlp = copy.deepcopy(timm_block.mlp)

    def forward(self, x):  # VPTBlock.forward (ls, drop_path: Identity)
        x_out, attn_out = self.attn(self.norm1(x))
        x = x + x_out
        x = x + self.mlp(self.norm2(x))
        return x, attn_out


class AuthorsViT(nn.Module):
    """models/vpt.py::PromptVisionTransformer with the parameter names of the authors' state dict."""

    def __init__(self, vit, args, p_idxs, num_prompts, mapping, global_pool, vpt_norm="none", mask=False,
                 divide_by8=True):
        super().__init__()
        self.args, self.p_idxs, self.global_pool = args, list(p_idxs), global_pool
        self.o_idxs = [i for i in range(DEPTH) if i not in self.p_idxs]
        self.num_img_tokens = vit.patch_embed.num_patches
        self.patch_embed, self.norm = copy.deepcopy(vit.patch_embed), copy.deepcopy(vit.norm)
        self.cls_token, self.pos_embed = copy.deepcopy(vit.cls_token), copy.deepcopy(vit.pos_embed)
        self.p_len = args.proxy_prompt_len
        divider = 8.0 if divide_by8 else 1.0
        self.proxy_prompt_tokens = nn.Parameter(
            nn.init.xavier_uniform_(torch.randn(len(self.p_idxs), self.p_len, D)) / divider)
        self.other_prompt_tokens = nn.Parameter(
            nn.init.xavier_uniform_(torch.randn(len(self.o_idxs), num_prompts, D)) / divider)
        self.vpt_norm = {"none": nn.Identity(), "layer": nn.LayerNorm(D, eps=1e-6)}.get(vpt_norm)
        self.l2 = vpt_norm == "l2"
        self.blocks = nn.ModuleList(
            AuthorsBlock(b, mask, self.p_len if i in self.p_idxs else num_prompts, self.num_img_tokens)
            for i, b in enumerate(vit.blocks))
        self.head = nn.Linear(D, args.num_classes)
        self.vpt_criterion = AuthorsCriterion(args, mapping)

    def norm_prompts(self, p):
        return F.normalize(p, p=2, dim=-1, eps=1e-6) if self.l2 else self.vpt_norm(p)

    def forward_features(self, x, labels=None):
        B = x.shape[0]
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.pos_embed
        vpt_loss = torch.tensor(0.0)
        for idx, blk in enumerate(self.blocks):
            x_cls, x_img = x[:, :1, :], x[:, -self.num_img_tokens:, :]
            if idx in self.p_idxs:
                prompt_tokens = self.norm_prompts(self.proxy_prompt_tokens[self.p_idxs.index(idx)]).unsqueeze(0)
            else:
                prompt_tokens = self.norm_prompts(self.other_prompt_tokens[self.o_idxs.index(idx)]).unsqueeze(0)
            expanded_tokens = prompt_tokens.expand(B, -1, -1)  # prompt_drop_rate 0 (every released config)
            _x = torch.cat((x_cls, expanded_tokens, x_img), dim=1)
            x, attn_out = blk(_x)
            if idx in self.p_idxs and self.training:
                vpt_loss = vpt_loss + self.vpt_criterion(_x, prompt_tokens, labels, blk.attn, attn_out)
        vpt_loss = vpt_loss / len(self.p_idxs)
        if self.global_pool:
            x = self.norm(x)
            out = x[:, 1:, :].mean(dim=1)
        else:
            x = self.norm(x)
            out = x[:, 0]
        return out, vpt_loss

    def forward(self, x, labels=None):
        x, vpt_loss = self.forward_features(x, labels)
        return self.head(x), vpt_loss


def authors_cosine_kmeans(data, k, centroids=None, tol=1e-4, max_iter=20, norm="layer"):
    """model_creator.py::cosine_kmeans (the device: the data's)."""
    zero_classes = (data == 0).all(dim=1)
    non_zero_data = data[~zero_classes]
    if norm == "l2":
        non_zero_data = F.normalize(non_zero_data, p=2, dim=1)
    elif norm == "layer":
        non_zero_data = F.layer_norm(non_zero_data, non_zero_data.shape[1:])
    if centroids is None:
        indices = torch.randperm(non_zero_data.size(0))[:k]
        centroids = non_zero_data[indices]
    for _ in range(max_iter):
        similarities = F.cosine_similarity(non_zero_data[:, None], centroids[None, :], dim=2)
        cluster_assignments = similarities.argmax(dim=1)
        new_centroids = []
        for i in range(k):
            assigned_data = non_zero_data[cluster_assignments == i]
            new_centroids.append(assigned_data.mean(dim=0) if assigned_data.size(0) > 0 else centroids[i])
        new_centroids = torch.stack(new_centroids)
        if torch.norm(centroids - new_centroids, dim=1).sum() < tol:
            break
        centroids = new_centroids
    zero_class_assignments = torch.randint(k, (zero_classes.sum(),), device=data.device)
    combined_assignments = torch.empty(data.size(0), dtype=torch.long, device=data.device)
    combined_assignments[~zero_classes] = cluster_assignments
    combined_assignments[zero_classes] = zero_class_assignments
    return centroids, combined_assignments


def authors_frozen_features(vit, x, global_pool):
    """models/vit.py::VisionTransformer.forward_features (the frozen copy of generate_semantic_mapping)."""
    B = x.shape[0]
    x = vit.patch_embed(x)
    x = torch.cat((vit.cls_token.expand(B, -1, -1), x), dim=1)
    x = x + vit.pos_embed
    for blk in vit.blocks:
        x = blk(x)
    if global_pool:
        return vit.norm(x[:, 1:, :].mean(dim=1))
    return vit.norm(x)[:, 0]


# -- fixtures -----------------------------------------------------------------------------------------
def tiny_vit(seed=0):
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=D,
                            depth=DEPTH, num_heads=2, num_classes=0)
    with torch.no_grad():  # non-degenerate biases and LayerNorm affines
        for n, p in vit.named_parameters():
            if n.endswith("bias") or "cls_token" in n:
                p.normal_(0, 0.2)
            elif "norm" in n and n.endswith("weight"):
                p.uniform_(0.5, 1.5)
    return vit.eval()


def pair(method="da-vpt", proxy_first=3, proxy_last=4, num_prompts=2, proxy_len=4, mask=False, vpt_norm="none",
         cls_type="query", global_pool=True, classes=C):
    """(gapt's model, the authors' model) on the same tiny ViT, with the same prompts, head and mapping."""
    vit = tiny_vit()
    args = Args(proxy_prompt_len=min(proxy_len, classes), num_classes=classes, cls_type=cls_type,
                initial_mapping="kmeans" if classes >= proxy_len else "all_classes")
    torch.manual_seed(1)
    mapping = torch.randint(0, args.proxy_prompt_len, (classes,))
    authors = AuthorsViT(copy.deepcopy(vit), args, range(proxy_first - 1, proxy_last), num_prompts, mapping,
                         global_pool, vpt_norm=vpt_norm, mask=mask)
    with torch.no_grad():
        authors.proxy_prompt_tokens.normal_(0, 0.5)
        authors.other_prompt_tokens.normal_(0, 0.5)
        if isinstance(authors.vpt_norm, nn.LayerNorm):
            authors.vpt_norm.weight.uniform_(0.5, 1.5)
            authors.vpt_norm.bias.normal_(0, 0.2)
    model = PromptedViT(vit, method=method, num_classes=classes, num_prompts=num_prompts, prompt_dropout=0.0,
                        pooling="mean_normed" if global_pool else "cls", davpt_proxy_len=proxy_len,
                        davpt_proxy_first=proxy_first, davpt_proxy_last=proxy_last, davpt_mask=mask,
                        davpt_prompt_norm=vpt_norm, davpt_cls_type=cls_type, davpt_patch_weight=0.05,
                        davpt_cls_weight=0.1, davpt_scale=5.0)
    load_authors_state(model, authors.state_dict())  # the authors' names: prompts, biases, head
    model.davpt_mapping.copy_(mapping if classes >= proxy_len else torch.arange(classes))
    if classes < proxy_len:
        authors.vpt_criterion.mapping = list(range(classes))
    return model, authors


def batch(seed=2, n=5, classes=C):
    torch.manual_seed(seed)
    return torch.randn(n, 3, 32, 32), torch.randint(0, classes, (n,))


# -- the loss -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [5.0, 1.0, 0.0])
def test_loss_value_and_gradient_equal_vptcriterion(scale):
    torch.manual_seed(0)
    B, P = 9, 4
    feats = torch.randn(B, D, requires_grad=True)
    prompts = torch.randn(P, D, requires_grad=True)
    labels = torch.randint(0, C, (B,))
    mapping = torch.tensor([0, 1, 1, 3, 0, 2])   # proxy 2 has one class; some batch proxies have no positive
    crit = AuthorsCriterion(Args(loss_vpt_scale_ratio=scale), mapping)
    mapped = crit._map_label_values(labels, crit.mapping)
    want = crit.ml_patch_forward((feats,), (prompts[None],), mapped)
    g_want = torch.autograd.grad(want, (feats, prompts))
    got = proxy_anchor_loss(feats, prompts, mapping[labels], scale)
    g_got = torch.autograd.grad(got, (feats, prompts))
    torch.testing.assert_close(got, want.squeeze(), rtol=1e-6, atol=1e-6)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_loss_with_a_proxy_without_negatives_or_positives_counts_zero_in_the_mean():
    feats, prompts = torch.randn(3, D), torch.randn(5, D)
    assigned = torch.tensor([1, 1, 1])   # 4 of 5 proxies have no positive; proxy 1 has no negative
    crit = AuthorsCriterion(Args(proxy_prompt_len=5), torch.arange(C) % 5)
    want = crit.ml_cls_forward((None, feats, None), (prompts[None],), assigned)
    torch.testing.assert_close(proxy_anchor_loss(feats, prompts, assigned, 5.0), want.squeeze())


# -- the forward and the whole training loss ------------------------------------------------------------
CASES = [dict(), dict(mask=True), dict(vpt_norm="l2", global_pool=False), dict(vpt_norm="layer", cls_type="key"),
         dict(num_prompts=0, proxy_first=4), dict(proxy_first=1, proxy_last=4, mask=True, cls_type="cls"),
         dict(proxy_len=8, classes=C)]  # 8 proxies for 6 classes: p_len = 6, class c -> proxy c


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("method", ["da-vpt", "da-vpt+"])
def test_logits_loss_and_gradients_equal_the_authors_forward(case, method):
    model, authors = pair(method=method, **case)
    x, y = batch()
    model.eval()
    authors.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), authors(x)[0], rtol=1e-5, atol=1e-5)
    model.train()
    authors.train()
    model.targets = y
    logits = model(x)
    ours = F.cross_entropy(logits, y) + sum(model.extra_losses)
    want_logits, vpt_loss = authors(x, y)
    theirs = F.cross_entropy(want_logits, y) + vpt_loss
    assert len(model.extra_losses) == len(authors.p_idxs)
    torch.testing.assert_close(sum(model.extra_losses), vpt_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    named = dict(authors.named_parameters())
    tuned = model.tuned_parameters()
    assert "proxy_prompt_tokens" in tuned and "other_prompt_tokens" in tuned
    for name, p in tuned.items():
        ref = named[authors_name(name)]
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    if method == "da-vpt+":  # the four "+" tensors of every released config, and the patch embedding's proj.bias
        want = {f"blocks.{i}.{t}" for i in range(DEPTH) for t in ("attn.v.bias", "attn.proj.bias", "mlp.fc2.bias",
                                                                    "norm2.bias")} | {"patch_embed.proj.bias"}
        assert {authors_name(n) for n in tuned if n.startswith("backbone.")} == want


def test_prompts_init_as_the_authors_draw_them():
    torch.manual_seed(7)
    want = nn.init.xavier_uniform_(torch.randn(2, 10, D)) / 8.0
    torch.manual_seed(7)
    torch.testing.assert_close(xavier_prompts(2, 10, D, True), want, rtol=0, atol=0)
    bound = math.sqrt(6 / (10 * 768 + 1 * 768))  # (depth 1, len 10, D 768): fan_in = len D, fan_out = depth D
    t = xavier_prompts(1, 10, 768, False)
    assert t.abs().max() <= bound and t.abs().max() > 0.9 * bound
    model = PromptedViT(tiny_vit(), method="da-vpt", num_classes=C, num_prompts=3, davpt_proxy_len=4)
    assert model.proxy_prompt_tokens.shape == (1, 4, D) and model.other_prompt_tokens.shape == (DEPTH - 1, 3, D)
    assert model.proxy_prompt_tokens.abs().max() <= math.sqrt(6 / (4 * D + D)) / 8
    assert model.num_prompts == 4   # the last block holds the proxies: 4 prompt tokens in the output


# -- k-means and the init pass ---------------------------------------------------------------------------
def test_cosine_kmeans_equals_the_authors():
    torch.manual_seed(0)
    data = torch.randn(12, D)
    data[[3, 7]] = 0.0  # classes without features: random proxies
    torch.manual_seed(5)
    want_c, want_a = authors_cosine_kmeans(data, 4)
    got_c, got_a = cosine_kmeans(data, 4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got_c, want_c)
    assert torch.equal(got_a, want_a)
    start = want_c + 0.3   # from given centroids (the dynamic re-clustering), no draw but the zero classes'
    torch.manual_seed(9)
    want_c, want_a = authors_cosine_kmeans(data, 4, centroids=start)
    got_c, got_a = cosine_kmeans(data, 4, centroids=start, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got_c, want_c)
    assert torch.equal(got_a, want_a)


class Images(torch.utils.data.Dataset):
    def __init__(self, n=30, classes=C, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.targets = [i % classes for i in range(n)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


@pytest.mark.parametrize("pooling,global_pool", [("mean_normed", True), ("cls", False)])
def test_init_pass_class_features_and_mapping_equal_the_authors(pooling, global_pool):
    from gapt.engine.davpt_init import frozen_class_features, init_davpt
    from gapt.model.parts.davpt_loss import class_samples
    vit = tiny_vit()
    frozen = copy.deepcopy(vit)
    model = PromptedViT(vit, method="da-vpt+", num_classes=C, num_prompts=2, davpt_proxy_len=3, pooling=pooling,
                        davpt_samples_per_class=4)
    data = Images()
    indices = class_samples(data.targets, C, 4, torch.Generator().manual_seed(11))
    assert len(indices) == 4 * C and all(sum(data.targets[i] == c for i in indices) == 4 for c in range(C))
    feats = frozen_class_features(model, data, indices, data.targets, C, "cpu", batch_size=7)
    with torch.no_grad():
        want = torch.stack([authors_frozen_features(frozen, torch.stack([data.x[i] for i in indices
                                                                         if data.targets[i] == c]), global_pool)
                            .mean(0) for c in range(C)])
    torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-5)
    summary = init_davpt(model, data, seed=11)
    g = torch.Generator().manual_seed(11)
    class_samples(data.targets, C, 4, g)                       # the same draws, in the same order
    _, mapping = cosine_kmeans(feats, 3, generator=g)
    assert summary["mapping"] == mapping.tolist() == model.davpt_mapping.tolist()
    assert summary["images"] == 4 * C and sum(summary["proxy_sizes"]) == C


def test_fewer_classes_than_proxies_maps_class_c_to_proxy_c():
    from gapt.engine.davpt_init import init_davpt
    model = PromptedViT(tiny_vit(), method="da-vpt", num_classes=3, num_prompts=2, davpt_proxy_len=10)
    assert model.proxy_prompt_tokens.shape[1] == 3
    assert init_davpt(model, Images(classes=3))["mapping"] == [0, 1, 2]


def test_dynamic_reclustering_from_the_epochs_pooled_features():
    """train.py: from epoch dynamic_kmeans on, the class means of the trained model's pooled features
    (create_cls_mean_features) are re-clustered after the epoch, from the previous centroids."""
    model, _ = pair(method="da-vpt")
    part = model.part("prompts")
    part.dynamic = 1
    part.hooks = part.hooks + ("mix",)
    model._hooks["mix"].append(part)
    part.centroids = torch.randn(4, D)
    start = part.centroids.clone()
    model.epoch_begin(0)
    assert not part._accumulating
    model.epoch_begin(1)
    x, y = batch(n=12)
    model.train()
    model.targets = y
    with torch.no_grad():
        model(x)
        feats = model.pool(model.run_blocks(model.embed(x))[0])   # no dropout: the same features
    means = torch.zeros(C, D)
    for c in range(C):
        if (y == c).any():
            means[c] = feats[y == c].mean(0)
    part.generator.manual_seed(3)
    model.epoch_end(1)
    want_c, want_a = cosine_kmeans(means, 4, start, torch.Generator().manual_seed(3))
    if len(torch.unique(want_a)) > 1:
        assert model.davpt_mapping.tolist() == want_a.tolist()
    assert part.reclustered == 1 and not part._accumulating


# -- compositions, settings, names ---------------------------------------------------------------------
def test_temperatures_compose_and_gates_are_refused_naming_both():
    model, authors = pair()
    x, _ = batch()
    with_t = PromptedViT(tiny_vit(), method="da-vpt", learn_temperature=True, num_classes=C, num_prompts=2,
                         prompt_dropout=0.0, pooling="mean_normed", davpt_proxy_len=4, davpt_proxy_first=3,
                         davpt_proxy_last=4)
    load_authors_state(with_t, {**authors.state_dict(), "temperature": torch.ones(DEPTH)})
    with torch.no_grad():
        torch.testing.assert_close(with_t(x), model(x), rtol=1e-5, atol=1e-5)   # tau = 1: the same model
        with_t.temperature.fill_(0.5)
        assert not torch.allclose(with_t(x), model(x))
    for method in ("gated+da-vpt", "da-vpt+vpt-deep"):
        with pytest.raises(ValueError) as e:
            PromptedViT(tiny_vit(), method=method, num_classes=C)
        assert all(f"'{n}'" in str(e.value) for n in method.split("+"))
    for method, both in (("bitfit+davpt-bias", ("bitfit", "davpt-bias")), ("full+davpt-bias", ("full", "davpt-bias")),
                         ("linear+da-vpt", ("linear", "da-vpt"))):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"method={method}"])
        assert all(f"'{n}'" in str(e.value) for n in both)


def test_settings_spelling_and_refusals():
    assert load_config(None, ["method=da-vpt+"]).method == "da-vpt+davpt-bias"
    assert load_config(None, ["method=davpt-bias+da-vpt"]).method == "da-vpt+davpt-bias"
    assert load_config(None, ["method=da-vpt", "num_prompts=0"]).num_prompts == 0   # no "other" prompts
    with pytest.raises(ConfigError, match="num_prompts"):
        load_config(None, ["method=vpt-deep", "num_prompts=0"])
    with pytest.raises(ConfigError, match="davpt_proxy_len=5 needs the da-vpt part"):
        load_config(None, ["method=gated", "davpt_proxy_len=5"])
    with pytest.raises(ConfigError, match="prompt_init"):
        load_config(None, ["method=da-vpt", "prompt_init=prototype"])
    with pytest.raises(ConfigError, match="davpt_bias_tensors"):
        load_config(None, ["method=da-vpt+", "davpt_bias_tensors=v.bias,qkv.weight"])
    with pytest.raises(ConfigError, match="davpt_prompt_norm"):
        load_config(None, ["method=da-vpt", "davpt_prompt_norm=batch"])
    with pytest.raises(ConfigError, match="train.clip_grad_value"):
        load_config(None, ["train.clip_grad_value=-1"])


def test_extra_plus_tensors_of_some_configs():
    """bias_k, norm_norm1, train_cls: k.bias, norm1 (weight and bias), cls_token."""
    model = PromptedViT(tiny_vit(), method="da-vpt+", num_classes=C, num_prompts=2,
                        davpt_bias_tensors="v.bias,proj.bias,fc2.bias,norm2.bias,k.bias,norm1,cls_token")
    names = {authors_name(n) for n in model.tuned_parameters() if n.startswith("backbone.")}
    assert {"blocks.0.attn.k.bias", "blocks.0.norm1.weight", "blocks.0.norm1.bias", "cls_token"} <= names
    assert "blocks.0.attn.q.bias" not in names
    assert model.frozen_leading_blocks == 0


def test_davpt_bias_folds_into_the_weights():
    from gapt.model.merge import merge
    model = PromptedViT(tiny_vit(), method="davpt-bias", num_classes=C,
                        davpt_bias_tensors="v.bias,k.bias,proj.bias,fc2.bias,norm2.bias")
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.add_(torch.randn_like(p) * 0.3)
    x, _ = batch()
    merged = merge(model)
    assert not any("v_bias" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-5)
    assert PromptedViT(tiny_vit(), method="da-vpt", num_classes=C).not_mergeable()


def test_param_groups_follow_the_authors_decay_rule():
    model = PromptedViT(tiny_vit(), method="da-vpt+", num_classes=C, num_prompts=2, davpt_prompt_norm="layer",
                        davpt_bias_tensors="v.bias,proj.bias,fc2.bias,norm2.bias,cls_token")
    groups = model.param_groups(0.5, head_weight_decay=0.05, head_bias_decay=False)
    by_id = {id(p): n for n, p in model.named_parameters()}
    decay = {by_id[id(p)] for p in groups[0]["params"]}
    none = {by_id[id(p)] for p in groups[1]["params"]}
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0, 0.05]
    assert decay == {"proxy_prompt_tokens", "other_prompt_tokens", "backbone.cls_token"}
    assert "head.bias" in none and "vpt_norm.weight" in none and "backbone.blocks.0.attn.qkv.v_bias" in none
    assert [by_id[id(p)] for p in groups[2]["params"]] == ["head.weight"]
    assert len(PromptedViT(tiny_vit(), method="vpt-deep", num_classes=C).param_groups(0.0)) == 1


# -- a run: the init pass before step 0, re-clustering, resume --------------------------------------------
def test_a_run_trains_records_the_mapping_and_resumes_exactly(tmp_path):
    import json
    from gapt.engine.trainer import train
    over = ["backbone=test_mae_tiny", "weights=null", "image_size=32", "data.num_workers=0", "device=cpu",
            "method=da-vpt+", "num_prompts=2", "davpt_proxy_len=2", "davpt_dynamic_kmeans=1", "davpt_mask=true",
            "davpt_drop_path=0.1", "prompt_dropout=0.1", "davpt_samples_per_class=3", "train.epochs=3",
            "train.batch_size=8", "train.optimizer=adamw", "train.lr=0.01", "train.weight_decay=0.1",
            "train.clip_grad_value=10", "train.head_weight_decay=0.05", "train.head_bias_decay=false",
            "data.format=shapes", "data.name=count", "data.num_samples=48", "train.max_steps_per_epoch=3"]
    full = train(load_config(None, over + [f"out={tmp_path / 'full'}"]))
    davpt = full["davpt"]
    assert davpt["init"]["images"] > 0 and davpt["reclustered"] == 2 and len(davpt["mapping"]) == davpt["init"]["classes"]
    assert full["tuned_params_by_part"]["davpt-bias"] > 0
    cfg = load_config(None, over + [f"out={tmp_path / 'cut'}"])
    train(cfg, stop_after_epoch=1)
    resumed = train(cfg, resume=True)
    assert resumed["metrics"] == full["metrics"]
    assert resumed["davpt"]["mapping"] == davpt["mapping"] and resumed["davpt"]["init"] is None
    assert json.loads((tmp_path / "full" / "results.json").read_text())["davpt"]["mapping"] == davpt["mapping"]


# -- presets: the authors' configs (Noahsark/DA-VPT configs/*.yaml, typed again here) ---------------------------
AUTHORS_CONFIGS = {  # preset -> the config's values (start/end idx + 1 = gapt's 1-based blocks)
    "vtab/mae_vitb16/da-vpt-plus/dtd": dict(lr=0.001, wd=0.5, wd_head=0.5, np=5, plen=10, first=12, last=12,
                                            norm="none", div8=True, w=(0.01, 0.01), tau=5.0, mask=False, dp=0.1,
                                            dyn=10, plus="v.bias,proj.bias,fc2.bias,norm2.bias,cls_token"),
    "fgvc/mocov3_vitb16/da-vpt-plus/cub": dict(lr=0.005, wd=1.0, wd_head=0.1, np=40, plen=20, first=12, last=12,
                                               norm="l2", div8=True, w=(0.1, 0.02), tau=1.0, mask=False, dp=0.1,
                                               dyn=1, plus="v.bias,proj.bias,fc2.bias,norm2.bias,k.bias,norm1,cls_token"),
    "fgvc/mae_vitb16/da-vpt-plus/cub": dict(lr=0.005, wd=0.01, wd_head=0.5, np=15, plen=20, first=10, last=12,
                                            norm="l2", div8=False, w=(0.05, 0.05), tau=5.0, mask=True, dp=0.0,
                                            dyn=1, plus="v.bias,proj.bias,fc2.bias,norm2.bias"),
    "vtab/mocov3_vitb16/da-vpt-plus/cifar": dict(lr=0.005, wd=5.0, wd_head=0.05, np=0, plen=5, first=3, last=12,
                                                 norm="none", div8=True, w=(0.01, 0.01), tau=5.0, mask=False, dp=0.1,
                                                 dyn=1, plus="v.bias,proj.bias,fc2.bias,norm2.bias,norm1,cls_token"),
}


@pytest.mark.parametrize("name", sorted(AUTHORS_CONFIGS))
def test_presets_carry_the_authors_configs(name):
    want = AUTHORS_CONFIGS[name]
    cfg = load_config(name)
    t = cfg.train
    assert cfg.method == "da-vpt+davpt-bias" and cfg.davpt_bias_tensors == want["plus"]
    assert (t.lr, t.weight_decay, t.head_weight_decay) == (want["lr"], want["wd"], want["wd_head"])
    assert (cfg.num_prompts, cfg.davpt_proxy_len, cfg.davpt_proxy_first, cfg.davpt_proxy_last) == \
        (want["np"], want["plen"], want["first"], want["last"])
    assert (cfg.davpt_prompt_norm, cfg.davpt_init_div8, (cfg.davpt_patch_weight, cfg.davpt_cls_weight),
            cfg.davpt_scale, cfg.davpt_mask, cfg.davpt_drop_path, cfg.davpt_dynamic_kmeans) == \
        (want["norm"], want["div8"], want["w"], want["tau"], want["mask"], want["dp"], want["dyn"])
    plain = load_config(name.replace("da-vpt-plus", "da-vpt"))
    assert plain.method == "da-vpt" and plain.train.lr == t.lr and plain.davpt_proxy_len == cfg.davpt_proxy_len


def test_every_davpt_preset_has_the_recipe_and_the_unreleased_ones_need_the_sweep():
    from pathlib import Path
    import gapt
    root = Path(gapt.__file__).parent / "configs"
    files = sorted(root.glob("*/*/da-vpt*/*.yaml"))
    assert len(files) == 2 * 2 * (5 + 19)
    swept = set()
    for f in files:
        cfg = load_config(str(f))
        backbone = f.parent.parent.name
        t = cfg.train
        assert (t.optimizer, t.clip_grad_value, t.batch_size, t.epochs, t.head_bias_decay, t.precision) == \
            ("adamw", 10.0, 32, 100, False, "fp32")
        assert cfg.prompt_dropout == 0.0 and cfg.davpt_samples_per_class == 10
        assert cfg.pooling == ("mean_normed" if backbone == "mae_vitb16" else "cls")
        assert cfg.method == ("da-vpt+davpt-bias" if f.parent.name == "da-vpt-plus" else "da-vpt")
        if "NEEDS THE LR SWEEP" in f.read_text():
            swept.add((backbone, f.stem))
    # SPEC §12.5(d): no configs for sun397, svhn, kitti, MAE pets, MoCo retinopathy
    assert swept == {(b, t) for b in ("mae_vitb16", "mocov3_vitb16") for t in ("sun397", "svhn", "kitti")} | \
        {("mae_vitb16", "oxford_iiit_pet"), ("mocov3_vitb16", "diabetic_retinopathy")}
