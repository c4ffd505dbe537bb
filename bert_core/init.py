"""Starting weights that let a fresh BERT read its neighbours from step 0 ("neighbour init").

Contract: `neighbour_init(model, layers)` rewrites, in place and without touching the
architecture, two sets of a freshly initialized BERT's weights (bert_core's or `transformers`'
BertForMaskedLM / BertModel: the parameter names are the same):
- the position embeddings become sinusoids (each pair of hidden dims one frequency), at an amplitude
  of 1.5 x `initializer_range`, about the scale of the word embeddings they are added to;
- in each of `layers`, every attention head's query and key weights read one block of those
  frequencies, the key's rotated so that head h's scores peak at the token `NEIGHBOUR_OFFSETS[h]`
  places away (the previous, next, second previous, second next, ...).
Everything else keeps BERT's init. The model stays a post-LN BERT with learned absolute positions:
these are starting values that training is free to change, and exports load in `transformers`.

Why: a BERT trained from BERT's init first learns character frequencies, then sits on a plateau
(13-15% masked-token accuracy on People's Daily, where counting the two neighbours gives 37%) until
its attention discovers where the neighbours are: the phase transition of Chen et al., "Sudden
Drops in the Loss" (ICLR 2024). From random position embeddings and random Q/K the signal that
finds them is a product of four small matrices, so it starts near zero. Giving the first layer
heads that already attend to fixed offsets (as structured initializations such as mimetic init,
Trockman & Kolter 2023, do for attention) removes that wait; BENCHMARKS.md has the curves.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Head h of an initialized layer looks this many tokens away (cycled when there are more heads).
NEIGHBOUR_OFFSETS = (-1, 1, -2, 2)
# The positional part of the target's pre-softmax score, were positions alone after the embedding
# LayerNorm. With the word embeddings beside them, ~82% of each head's attention starts on its
# neighbour (People's Daily rows, mini preset; a uniform head gives 1/128 to each token).
PEAK_SCORE = 64.0
# x initializer_range: the sinusoids' amplitude, measured in the Hugging Face loop (BENCHMARKS.md).
# 2.0 made the heads sharper (~95% on the neighbour) but drowned which character sits there: one
# run of three stayed on the unigram solution (4.2%) for 800 steps. 1.0 left the heads too blurred
# to matter: on BERT's plateau (13.5% at step 400). 1.5 passed it in every run (23% at step 400).
POSITION_AMPLITUDE = 1.5
LOWEST_FREQUENCY = 0.15  # radians per position: slower waves can't tell a neighbour from itself
GOLDEN = (math.sqrt(5) - 1) / 2


def frequencies(n: int) -> torch.Tensor:
    """(n,) angular frequencies in [LOWEST_FREQUENCY, pi), spread by the golden-ratio sequence: no two
    heads share a set, and no regular spacing makes a head's scores repeat at a distance (aliasing)."""
    k = torch.arange(1, n + 1, dtype=torch.float64)
    return (LOWEST_FREQUENCY + (math.pi - LOWEST_FREQUENCY) * torch.frac(k * GOLDEN)).float()


def sinusoid_positions(num_positions: int, hidden: int, amplitude: float) -> torch.Tensor:
    """(P, H): position p's dims (2j, 2j+1) are amplitude * (sin, cos)(w_j p)."""
    w = frequencies(hidden // 2)  # (H/2,)
    angle = torch.arange(num_positions, dtype=torch.float32)[:, None] * w[None]  # (P, H/2)
    table = torch.zeros(num_positions, hidden)  # (P, H)
    table[:, 0::2] = amplitude * torch.sin(angle)
    table[:, 1::2] = amplitude * torch.cos(angle)
    return table


def neighbour_qk(hidden: int, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, H) query and key weights: head h's query rows read its block of frequency pairs,
    its key rows the same pairs rotated by -offset, so q_i . k_j = a^2 sum_j cos(w (i - j + offset)):
    largest where j = i + offset."""
    head_dim = hidden // num_heads
    pairs = head_dim // 2
    w = frequencies(hidden // 2)
    # A pair at unit amplitude after the embedding LayerNorm contributes 2 a^2 / sqrt(head_dim).
    a = math.sqrt(PEAK_SCORE * math.sqrt(head_dim) / (2 * pairs))
    q, k = torch.zeros(hidden, hidden), torch.zeros(hidden, hidden)
    for h in range(num_heads):
        offset = NEIGHBOUR_OFFSETS[h % len(NEIGHBOUR_OFFSETS)]
        for j in range(pairs):
            pair = h * pairs + j
            row, s, c = h * head_dim + 2 * j, 2 * pair, 2 * pair + 1  # output rows; sin, cos dims
            cos_o, sin_o = math.cos(w[pair] * offset), math.sin(w[pair] * offset)
            q[row, s] = q[row + 1, c] = a
            # (sin, cos)(w (p - offset)) from (sin, cos)(w p): a rotation of the pair.
            k[row, s], k[row, c] = a * cos_o, -a * sin_o
            k[row + 1, s], k[row + 1, c] = a * sin_o, a * cos_o
    return q, k


def check_neighbour_init(config, layers: tuple[int, ...] = (0,)) -> None:
    """Refuse a config neighbour init can't apply to (an odd head size: the sinusoids come in
    pairs; a layer the model doesn't have), so a caller can say so before building anything."""
    head_dim = config.hidden_size // config.num_attention_heads
    if head_dim % 2:
        raise ValueError(f"neighbour init needs an even head size (hidden_size / num_attention_heads), got {head_dim}")
    for i in layers:
        if not 0 <= i < config.num_hidden_layers:
            raise ValueError(f"neighbour init: layer {i} is not in this {config.num_hidden_layers}-layer model")


@torch.no_grad()
def neighbour_init(model: nn.Module, layers: tuple[int, ...] = (0,)) -> None:
    """Apply neighbour init to a freshly initialized BERT (see the module docstring)."""
    bert = model.bert if hasattr(model, "bert") else model
    config = bert.config
    check_neighbour_init(config, layers)
    hidden, heads = config.hidden_size, config.num_attention_heads
    pos = bert.embeddings.position_embeddings.weight  # (P, H)
    pos.copy_(sinusoid_positions(pos.shape[0], hidden, POSITION_AMPLITUDE * config.initializer_range))
    q, k = neighbour_qk(hidden, heads)
    for i in layers:
        attention = bert.encoder.layer[i].attention.self
        attention.query.weight.copy_(q)
        attention.key.weight.copy_(k)
        attention.query.bias.zero_()
        attention.key.bias.zero_()
