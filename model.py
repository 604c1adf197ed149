"""The model of docs/SPEC.md §2 in plain PyTorch: a GPT-style language model whose FFN layers are either
Multi-Head LatentMoE (what train_latentmoe trains) or a standard MoE (what moe_ep_baseline trains), the
MoE routed by top-k (SPEC §2.2) or by LocMoE (SPEC §2.6: GrAP gate, capacity, L_aux and L_loc).

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
    router: str = "topk"      # the MoE's: "topk" (SPEC §2.2) or "locmoe" (SPEC §2.6)
    capacity_factor: float = 0.0   # LocMoE's c_f; 0: no capacity, nothing dropped
    capacity_delta: float = 0.03   # LocMoE's δ, for the capacity's lower bound ec_min
    aux_loss_weight: float = 0.01  # LocMoE's α (L_aux)
    loc_loss_weight: float = 0.01  # LocMoE's μ (L_loc)
    rank: int = 0             # LocMoE: the rank this model stands for, of `world` ranks in nodes of
    world: int = 1            # `node_size` consecutive ranks; it sets the locality target D_l
    node_size: int = 1

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
            shapes.update({p + "router_eps": [c.E]} if c.router == "locmoe" else  # LocMoE's ε
                          {p + "router": [c.d, c.E]})                             # R
            shapes.update({p + "expert_in": [c.E, c.fe, c.d],          # W1_e
                           p + "expert_out": [c.E, c.d, c.fe]})        # W2_e
    return shapes


def init_params(c, seed=0):
    """SPEC §2: every matrix ~ N(0, 0.02²), the last matrix of each residual branch ~ N(0, (0.02/√(2L))²),
    RMSNorm gains 1, LocMoE's ε 0, the padded vocabulary rows 0. The C++ draws other random numbers
    (util/rng.h)."""
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in param_shapes(c).items():
        if name.endswith("router_eps"):
            w = torch.zeros(shape, dtype=torch.float64)
        elif len(shape) == 1:
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


def capacity_bound(c):
    """SPEC §2.6: ec_min = ⌈1 / (E·p_δ)⌉ with p_δ = 1 − I_{δ²}(1/2, (d−1)/2), the chance that a random
    direction in d dimensions has |cos| ≥ δ with a fixed one. The cosine t has density
    ∝ (1 − t²)^((d−3)/2); with t = sin φ that is
        p_δ = ∫_{asin δ}^{π/2} cos^(d−2) φ dφ / ∫_0^{π/2} cos^(d−2) φ dφ,
    here by Simpson's rule (smooth integrands: far below 1e-12). Returns (p_δ, ec_min)."""
    def integral(a, b, n=20000):  # Simpson's rule with n (even) intervals
        phi = torch.linspace(a, b, n + 1, dtype=torch.float64)
        w = torch.ones(n + 1, dtype=torch.float64)
        w[1:-1:2], w[2:-1:2] = 4, 2
        return (w * torch.cos(phi) ** (c.d - 2)).sum().item() * (b - a) / (3 * n)
    p_delta = integral(math.asin(c.capacity_delta), math.pi / 2) / integral(0, math.pi / 2)
    return p_delta, math.ceil(1 / (c.E * p_delta))


def expert_capacity(c, N):
    """SPEC §2.6: the rows each expert takes from a micro-batch of N tokens, C = max(ec_min, ⌈c_f·N·k/E⌉);
    0 (c_f = 0): unlimited."""
    if c.capacity_factor == 0:
        return 0
    return max(capacity_bound(c)[1], math.ceil(c.capacity_factor * N * c.k / c.E))


def locality_target(c):
    """SPEC §2.6's D_l, (E): (1 − η)·uniform over the experts on this rank's node + η·uniform over all E,
    η = 0.1. Expert Parallel gives rank r experts [r·E/R, (r+1)·E/R) (SPEC §3)."""
    owner = torch.arange(c.E) // (c.E // c.world)                    # (E) the rank holding each expert
    local = (owner // c.node_size == c.rank // c.node_size).double()  # (E) 1 on this rank's node
    return 0.9 * local / local.sum() + 0.1 / c.E


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

    # SPEC §2.6, LocMoE's gate: p = softmax over all E of ReLU(x Ω^T + ε), for rows x (N, d), ε (E).
    # Ω (E, d) is grouped average pooling: row i averages the i-th of E equal groups of features.
    def grap(self, x, eps):
        E, d = self.cfg.E, self.cfg.d
        Omega = torch.eye(E, dtype=x.dtype).repeat_interleave(d // E, dim=1) * E / d  # (E, d), fixed
        return torch.softmax(torch.relu(x @ Omega.T + eps), dim=-1)                    # (N, E)

    # SPEC §2.6: copy (t, j) of the choices S (N, k) is kept while fewer than C earlier tokens chose its
    # expert, so the latest tokens of the micro-batch are dropped first. C = 0 keeps every copy.
    def capacity_keep(self, S, C):
        chosen = torch.zeros(S.shape[0], self.cfg.E, dtype=torch.long).scatter_(1, S, 1)  # (N, E) 0/1
        earlier = chosen.cumsum(0) - chosen                  # (N, E): earlier tokens that chose each expert
        return torch.gather(earlier, 1, S) < C if C else torch.ones_like(S, dtype=torch.bool)  # (N, k)

    # SPEC §2.6: the gate of copy (t, j) is the full softmax's p[t, S[t, j]], not renormalised over S
    def locmoe_gates(self, p, S):
        return torch.gather(p, 1, S)

    # SPEC §2.6: L_aux = α·E·Σ_i f_i P_i and L_loc = μ·KL(P ‖ D_l), from p (N, E) and the choices S
    # (N, k) before the capacity drop. f_i: share of the N·k slots on expert i (no gradient); P_i: mean p.
    def router_losses(self, p, S):
        c = self.cfg
        f = torch.bincount(S.reshape(-1), minlength=c.E).double() / S.numel()  # (E)
        P = p.mean(dim=0)                                                      # (E)
        D = locality_target(c)                                                 # (E)
        return c.aux_loss_weight * c.E * (f * P).sum(), c.loc_loss_weight * (P * torch.log(P / D)).sum()

    # SPEC §2.6: LocMoE's FFN on x (N, d); sel (N, k), or None to choose here. Returns the output and
    # the layer's L_aux and L_loc.
    def locmoe(self, x, eps, W_in, W_out, sel=None):
        p = self.grap(x, eps)                                                   # (N, E)
        S = topk_lower_index_first(p, self.cfg.k) if sel is None else sel        # (N, k)
        kept = self.capacity_keep(S, expert_capacity(self.cfg, x.shape[0]))     # (N, k)
        y = self.experts(x, S.masked_fill(~kept, -1), self.locmoe_gates(p, S), W_in, W_out)  # -1: no expert
        return (y, *self.router_losses(p, S))

    # FFN of layer l on x (N, d); bias (H, E); sel (H, N, k), or None to choose here. Returns the
    # output and the layer's L_aux and L_loc (0 but for LocMoE).
    def ffn(self, l, x, bias, sel=None):
        c, pre = self.cfg, "layer%d." % l
        p = {name[len(pre):]: w for name, w in self.params.items() if name.startswith(pre)}
        chosen = [None] * c.H if sel is None else sel
        if c.ffn == "moe" and c.router == "locmoe":
            return self.locmoe(x, p["router_eps"], p["expert_in"], p["expert_out"].transpose(1, 2), chosen[0])
        if c.ffn == "moe":                                  # SPEC §2.2: whole tokens, one routing group
            s = x @ p["router"]                              # (N, E)
            S, gates = self.route(s, bias[0], chosen[0])
            return self.experts(x, S, gates, p["expert_in"], p["expert_out"].transpose(1, 2)), 0, 0
        N = x.shape[0]                                      # SPEC §2.1: H latent sub-tokens per token
        u = (x @ p["ffn_in"].T).reshape(N, c.H, c.dh)       # project: u[t, h] (dh)
        s = torch.einsum("nhd,hde->nhe", u, p["router"])    # (N, H, E): each head has its own router
        K, V = p["expert_in"], p["expert_out"]              # (H, E, fe, dh)
        y = torch.stack([self.experts(u[:, h], *self.route(s[:, h], bias[h], chosen[h]), K[h], V[h])
                         for h in range(c.H)], dim=1)       # (N, H, dh): heads never mix
        return y.reshape(N, c.H * c.dh) @ p["ffn_out"].T, 0, 0   # merge

    # The loss's parts for targets (B, T) given tokens (B, T); bias (L, H, E); sel (L, H, N, k) or None:
    # the mean cross-entropy, and L_aux and L_loc summed over the layers (0 but for LocMoE)
    def losses(self, tokens, targets, bias, sel=None):
        c, p = self.cfg, self.params
        x = p["wte"][tokens.reshape(-1)]                    # (N, d); no positional embedding
        aux = loc = 0
        for l in range(c.L):
            pre = "layer%d." % l
            x = x + self.attention(self.rmsnorm(x, p[pre + "ln1"]), p[pre + "qkv"], p[pre + "attn_out"],
                                   tokens.shape[0])
            y, layer_aux, layer_loc = self.ffn(l, self.rmsnorm(x, p[pre + "ln2"]), bias[l],
                                               None if sel is None else sel[l])
            x, aux, loc = x + y, aux + layer_aux, loc + layer_loc
        logits = (self.rmsnorm(x, p["lnf"]) @ p["lm_head"].T)[:, :c.V]  # (N, V): padded logits dropped
        targets = targets.reshape(-1)
        cross_entropy = (torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None])[:, 0]).mean()
        return cross_entropy, aux, loc

    # the loss the gradients are of (SPEC §2.6): cross-entropy + Σ over layers (L_aux + L_loc)
    def loss(self, tokens, targets, bias, sel=None):
        return sum(self.losses(tokens, targets, bias, sel))


if __name__ == "__main__":
    torch.manual_seed(0)
    for cfg in (Config(), Config(ffn="moe", H=1, dh=64), Config(ffn="moe", H=1, dh=64, router="locmoe")):
        model = Model(cfg, init_params(cfg))
        tokens = torch.randint(cfg.V, (2, cfg.T + 1))
        loss = model.loss(tokens[:, :-1], tokens[:, 1:], torch.zeros(cfg.L, cfg.H, cfg.E, dtype=torch.float64))
        loss.backward()
        print("%-9s %-6s %d parameters, loss at initialisation %.4f (ln V = %.4f)" % (
            cfg.ffn, cfg.router, sum(w.numel() for w in model.params.values()), loss.item(), math.log(cfg.V)))
