"""The model of docs/SPEC.md §2 in plain PyTorch: a GPT-style language model whose FFN layers are either
Multi-Head LatentMoE (what train_latentmoe trains) or a standard MoE (what moe_ep_baseline trains).

This file says what the CUDA computes, in the fewest lines, so you can read it beside the kernels. It is
not fast and has no parallelism; the C++/CUDA trainers are the implementation. It shares no code with
them: tests/torch_oracle.py runs this model in float64 under autograd and checks the C++ reference's
(and the GPU's) loss and every gradient against it.

Parameter names and shapes are those of model/params.h ("wte", "layer0.qkv", "layer0.router", ...);
a matrix W: (O, I) maps I inputs to O outputs, y = x W^T. Nothing here has a bias vector.

    python3 model.py        initialises the tiny preset (SPEC §2's recipe, but torch's random numbers,
                            not the C++ generator's) and prints the loss of one batch of random tokens
"""
import math
from dataclasses import dataclass

import torch


@dataclass
class Config:                 # defaults: the tiny preset of train_latentmoe (model/config.h)
    ffn: str = "latentmoe"    # "latentmoe" (SPEC §2.1) or "moe" (SPEC §2.2)
    T: int = 32               # sequence length
    d: int = 64               # width
    L: int = 2                # layers
    n_head: int = 4           # attention heads, each d / n_head wide
    V: int = 256              # vocabulary
    H: int = 4                # latent heads (the MoE: 1)
    dh: int = 16              # latent head size (the MoE: d)
    E: int = 8                # experts per latent head (the MoE: experts)
    fe: int = 32              # expert hidden size (the MoE's f)
    k: int = 2                # experts each (sub-)token is routed to

    @property
    def Vp(self):             # the LM head's rows: V padded to a multiple of 128; padded logits never count
        return (self.V + 127) // 128 * 128


def param_shapes(c):
    """Every parameter tensor and its shape, in the layout's names."""
    attn = c.d // c.n_head * c.n_head
    shapes = {"wte": [c.Vp, c.d], "lnf": [c.d], "lm_head": [c.Vp, c.d]}
    for l in range(c.L):
        p = "layer%d." % l
        shapes.update({p + "ln1": [c.d], p + "qkv": [3 * attn, c.d], p + "attn_out": [c.d, attn], p + "ln2": [c.d]})
        if c.ffn == "latentmoe":
            shapes.update({p + "ffn_in": [c.H * c.dh, c.d],            # W_mh
                           p + "ffn_out": [c.d, c.H * c.dh],           # W_mg
                           p + "router": [c.H, c.dh, c.E],             # R_h
                           p + "expert_in": [c.H, c.E, c.fe, c.dh],    # K_{h,e}
                           p + "expert_out": [c.H, c.E, c.fe, c.dh]})  # V_{h,e}
        else:
            shapes.update({p + "router": [c.d, c.E],                   # R
                           p + "expert_in": [c.E, c.fe, c.d],          # W1_e
                           p + "expert_out": [c.E, c.d, c.fe]})        # W2_e
    return shapes


def init_params(c, seed=0):
    """SPEC §2: every matrix ~ N(0, 0.02²), the last matrix of each residual branch ~ N(0, (0.02/√(2L))²),
    RMSNorm gains 1, the padded vocabulary rows 0. The C++ draws other random numbers (util/rng.h)."""
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in param_shapes(c).items():
        if len(shape) == 1:
            w = torch.ones(shape, dtype=torch.float64)
        else:
            last = name.endswith(("attn_out", "ffn_out")) or (c.ffn == "moe" and name.endswith("expert_out"))
            std = 0.02 / math.sqrt(2 * c.L) if last else 0.02
            w = std * torch.randn(shape, generator=gen, dtype=torch.float64)
            if name in ("wte", "lm_head"):
                w[c.V:] = 0
        params[name] = w.requires_grad_(True)
    return params


def topk_lower_index_first(scores, k):
    """The k largest scores along the last dim; equal scores go to the lower index (SPEC's tie rule)."""
    return torch.sort(-scores, dim=-1, stable=True).indices[..., :k]


def update_routing_bias(bias, counts, gamma):
    """SPEC §2.3, after each optimizer step: counts (..., E) routed slots per expert; b += γ·(σ − mean σ)
    with σ = sign(mean load − load), taken exactly in integers as moe/router.cuh does."""
    E = counts.shape[-1]
    sigma = torch.sign(counts.sum(-1, keepdim=True) - E * counts).to(bias.dtype)
    return bias + gamma * (sigma - sigma.mean(-1, keepdim=True))


class Model:
    def __init__(self, cfg, params):
        self.cfg, self.params = cfg, params

    # RMSNorm(x; g) = g ⊙ x / sqrt(mean(x²) + 1e-5)
    def rmsnorm(self, x, g):
        return g * x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-5)

    # the exact GELU: 0.5·x·(1 + erf(x/√2))
    def gelu(self, x):
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    # x: (B, T, heads, da). The pair (2i, 2i+1) at position pos turns by pos·10000^(−2i/da).
    def rotary(self, x):
        B, T, heads, da = x.shape
        pos = torch.arange(T, dtype=torch.float64)
        i = torch.arange(da // 2, dtype=torch.float64)
        angle = pos[:, None] * torch.pow(torch.tensor(10000.0, dtype=torch.float64), -2 * i / da)  # (T, da/2)
        cos, sin = torch.cos(angle)[None, :, None, :], torch.sin(angle)[None, :, None, :]
        pairs = x.reshape(B, T, heads, da // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(B, T, heads, da)

    # causal softmax attention, rotary q and k; x: (B·T, d) normalised input, W_qkv rows [q | k | v]
    def attention(self, x, W_qkv, W_o, B):
        T, nh = self.cfg.T, self.cfg.n_head
        da = self.cfg.d // nh
        qkv = (x @ W_qkv.T).reshape(B, T, 3, nh, da)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]   # (B, T, nh, da)
        q, k = self.rotary(q), self.rotary(k)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # (B, nh, T, da)
        scores = q @ k.transpose(-1, -2) / math.sqrt(da)      # (B, nh, T, T)
        future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        probs = torch.softmax(scores.masked_fill(future, -math.inf), dim=-1)
        o = (probs @ v).permute(0, 2, 1, 3).reshape(B * T, nh * da)
        return o @ W_o.T

    # One routing group (a latent head, or the MoE layer): logits s (M, E) -> chosen experts S (M, k) =
    # top-k of s + bias (or `sel`, a selection made elsewhere), gates = softmax over S of the unbiased s.
    def route(self, s, bias, sel=None):
        S = topk_lower_index_first(s + bias, self.cfg.k) if sel is None else sel
        return S, torch.softmax(torch.gather(s, 1, S), dim=-1)

    # y[t] = Σ_j gate[t, j] · W_out[S_j]^T GELU(W_in[S_j] x[t]) for rows x (M, D); W_in, W_out: (E, F, D)
    def experts(self, x, S, gates, W_in, W_out):
        y = torch.zeros_like(x)
        for e in range(W_in.shape[0]):
            rows, slots = (S == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            hidden = self.gelu(x[rows] @ W_in[e].T)  # (m, F): what the IO-aware kernels keep on chip
            y = y.index_add(0, rows, gates[rows, slots][:, None] * (hidden @ W_out[e]))
        return y

    # FFN of layer l on x (N, d); bias (H, E); sel (H, N, k), or None to choose here
    def ffn(self, l, x, bias, sel=None):
        c, pre = self.cfg, "layer%d." % l
        p = {name[len(pre):]: w for name, w in self.params.items() if name.startswith(pre)}
        chosen = [None] * c.H if sel is None else sel
        if c.ffn == "moe":                                  # SPEC §2.2: whole tokens, one routing group
            s = x @ p["router"]                              # (N, E)
            S, gates = self.route(s, bias[0], chosen[0])
            return self.experts(x, S, gates, p["expert_in"], p["expert_out"].transpose(1, 2))
        N = x.shape[0]                                      # SPEC §2.1: H latent sub-tokens per token
        u = (x @ p["ffn_in"].T).reshape(N, c.H, c.dh)       # project: u[t, h] (dh)
        s = torch.einsum("nhd,hde->nhe", u, p["router"])    # (N, H, E): each head has its own router
        K, V = p["expert_in"], p["expert_out"]              # (H, E, fe, dh)
        y = torch.stack([self.experts(u[:, h], *self.route(s[:, h], bias[h], chosen[h]), K[h], V[h])
                         for h in range(c.H)], dim=1)       # (N, H, dh): heads never mix
        return y.reshape(N, c.H * c.dh) @ p["ffn_out"].T    # merge

    # mean cross-entropy of targets (B, T) given tokens (B, T); bias (L, H, E); sel (L, H, N, k) or None
    def loss(self, tokens, targets, bias, sel=None):
        c, p = self.cfg, self.params
        x = p["wte"][tokens.reshape(-1)]                    # (N, d); no positional embedding
        for l in range(c.L):
            pre = "layer%d." % l
            x = x + self.attention(self.rmsnorm(x, p[pre + "ln1"]), p[pre + "qkv"], p[pre + "attn_out"],
                                   tokens.shape[0])
            x = x + self.ffn(l, self.rmsnorm(x, p[pre + "ln2"]), bias[l], None if sel is None else sel[l])
        logits = (self.rmsnorm(x, p["lnf"]) @ p["lm_head"].T)[:, :c.V]  # (N, V): padded logits dropped
        targets = targets.reshape(-1)
        return (torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None])[:, 0]).mean()


if __name__ == "__main__":
    torch.manual_seed(0)
    for cfg in (Config(), Config(ffn="moe", H=1, dh=64)):
        model = Model(cfg, init_params(cfg))
        tokens = torch.randint(cfg.V, (2, cfg.T + 1))
        loss = model.loss(tokens[:, :-1], tokens[:, 1:], torch.zeros(cfg.L, cfg.H, cfg.E, dtype=torch.float64))
        loss.backward()
        print("%-9s %d parameters, loss at initialisation %.4f (ln V = %.4f)" % (
            cfg.ffn, sum(w.numel() for w in model.params.values()), loss.item(), math.log(cfg.V)))
