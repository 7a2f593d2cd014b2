"""VFPT, Visual Fourier Prompt Tuning (Zeng et al., NeurIPS 2024; SPEC §12.3): deep prompts, of which the first
Mf = floor(M * alpha) of every block go through a 2-D discrete Fourier transform before they enter it.

As the official code runs it (runtsang/VFPT @ 1b3d9846, ``src/models/vit_prompt/vit_fourier_mae.py`` and
``vit_fourier_moco.py``: ``FNetBlock``, ``PromptedVisionTransformer.incorporate_prompt / forward_features``),
before every block l (block 1 included, where VPT's shallow tensor enters):

    P~ = Dropout(P_l)                                  dropout first, a mask per sample (prompt_proj is Identity)
    F  = Re( fft( fft(P~[:Mf], dim=-1), dim=-2 ) )     FNetBlock: over the hidden dim, then over the Mf prompts
    x  = [cls, F, P~[Mf:], patches]                    Fourier prompts first (FOURIER_LOCATION 'prepend')

- The FFT runs over the Mf Fourier prompts only, not the whole sequence; it is unnormalised (torch's default
  "backward" norm: F[0, 0] is the sum of P~[:Mf]) and keeps the real part; it has no parameters.
- alpha is ``fourier_fraction`` (``FOURIER_PERCENTAGE``: the config default is 0.5, the README's recipe 1.0), the
  same at every block. ``FOURIER_DIMENSION`` is ignored by the MAE / MoCo files (always the 2-D transform), so
  gapt has no such key. Mf = 0 is refused (the official code fails on an FFT over no prompt).
- Init, trained tensors, names and readout are VPT-deep's: ``prompt_embeddings`` (1, M, D) and
  ``deep_prompt_embeddings`` (L-1, M, D), U(+-v); a tuned file of VFPT's trainer (``enc.prompt_embeddings``,
  ``enc.deep_prompt_embeddings``, ``head.last_layer.*``) loads with ``load_tuned`` into ``method=vfpt``.
"""
from __future__ import annotations

import math

import torch

from .prompts import PromptTokens


def fourier_prompts(p: torch.Tensor, num_fourier: int) -> torch.Tensor:
    """``p`` (B, M, D) with its first ``num_fourier`` prompts replaced by Re(FFT_2d) over (prompts, hidden)."""
    f = torch.fft.fft(torch.fft.fft(p[:, :num_fourier], dim=-1), dim=-2).real  # FNetBlock's two transforms
    return f if num_fourier == p.shape[1] else torch.cat([f, p[:, num_fourier:]], dim=1)


class FourierPrompts(PromptTokens):
    """VPT-deep prompts whose first floor(M * fourier_fraction) per block enter through the 2-D FFT."""

    def __init__(self, settings, component: str = "vfpt"):
        super().__init__(settings, component)
        self.deep = True
        self.num_fourier = math.floor(self.num_prompts * float(settings.fourier_fraction))
        if not 1 <= self.num_fourier <= self.num_prompts:
            raise ValueError(f"fourier_fraction={settings.fourier_fraction} with num_prompts={self.num_prompts} gives "
                             f"{self.num_fourier} Fourier prompts; it must give 1..{self.num_prompts}")

    def not_mergeable(self) -> str:
        return "vfpt: Fourier prompts are extra tokens in the sequence, not a change of the weights"

    def transform(self, model, i: int, p: torch.Tensor) -> torch.Tensor:
        return fourier_prompts(p, self.num_fourier)
