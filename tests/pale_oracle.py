"""Independent dense reference for pale attention (float64, explicit masks)."""
import math

import torch


def pale_groups_of(length: int, size: int) -> torch.Tensor:
    """Group id of each line: line r belongs to group r % ceil(length / size)."""
    return torch.arange(length) % math.ceil(length / size)


def dense_pale_attention(q, k, v, hw_shape, pale_size, num_heads):
    """Per token, softmax attention over every real token of its row group (first
    C/2 channels) or column group (last C/2 channels), computed densely on the
    full (H*W) x (H*W) score matrix with a boolean mask."""
    H, W = hw_shape
    sr, sc = (pale_size, pale_size) if isinstance(pale_size, int) else pale_size
    B, N, C = q.shape
    c, h = C // 2, num_heads // 2
    d = c // h
    rows = pale_groups_of(H, sr).view(H, 1).expand(H, W).reshape(N)
    cols = pale_groups_of(W, sc).view(1, W).expand(H, W).reshape(N)
    masks = [rows[:, None] == rows[None, :], cols[:, None] == cols[None, :]]
    outs = []
    for branch, mask in enumerate(masks):
        sl = slice(branch * c, (branch + 1) * c)
        qb, kb, vb = (t[..., sl].double().reshape(B, N, h, d).transpose(1, 2)
                      for t in (q, k, v))
        scores = qb @ kb.transpose(-1, -2) * d ** -0.5
        scores = scores.masked_fill(~mask, float('-inf'))
        outs.append((scores.softmax(-1) @ vb).transpose(1, 2).reshape(B, N, c))
    return torch.cat(outs, -1)
