#!/usr/bin/env python3
"""Independent oracle (SPEC §8.3): recomputes one training step of a model dump with PyTorch autograd.

    python3 tests/torch_oracle.py DIR [--tolerance X] [--tie-margin M] [--mutate NAME]

DIR is a dump written by tests/model_dump.h (meta.json + raw little-endian .bin files). The model is
written here from SPEC §2 alone, in float64 on the CPU, and shares no code with the C++ reference or the
GPU kernels; autograd supplies every gradient. Checked, one line each:
  - the parameter layout: every tensor SPEC §2 implies, with its shape, and nothing else;
  - the dumped expert selection: valid ids, k distinct experts per row, and the same sets as our own
    top-k of s + b (ties to the lower index). With --tie-margin M > 0 (GPU dumps) a row may differ when
    the dumped set is still a top-k within M, i.e. a near-tie. The gradients always use the dumped
    selection, so a near-tie flip cannot spoil them;
  - the loss and the gradient of every parameter tensor: relative error |ours - dump| / |ours| (2-norm)
    must be at most --tolerance (default 1e-9: double against double).
Prints "N passed, M failed" last. Exit 0 if all passed, 1 if any failed, 77 if PyTorch is missing.

Conventions that SPEC §2 leaves to the layout (tensor names and shapes come from meta.json):
  - W_qkv rows are [q | k | v], each n_head·d_attn wide, head h at rows h·d_attn of its part;
  - expert tensors: LatentMoE R (H, dh, E), K and V (H, E, fe, dh); MoE R (d, E), W1 (E, f, d), W2 (E, d, f);
  - wte and lm_head have Vp = roundup(V, 128) rows; rows >= V are padding that must never count.

--mutate NAME deliberately breaks this model in one way (see MUTATIONS) to show the check can fail:
tests/test_torch_oracle.sh expects every mutation to be caught.
"""
import argparse
import json
import math
import os
import sys

# Deliberate mistakes, each a bug a real implementation could have. The oracle must FAIL under each.
MUTATIONS = {
    "selection-without-bias": "choose the top-k of s instead of s + b",
    "gates-with-bias": "softmax the gates over s + b instead of the unbiased s",
    "tanh-gelu": "use the tanh approximation of GELU",
    "transposed-router": "read each router matrix as (E, D) instead of (D, E)",
    "rope-half-split": "rotate pairs (i, i + d_attn/2) instead of adjacent pairs (2i, 2i+1)",
    "padded-vocab-counts": "let the padded logits (>= V) into the softmax",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", help="dump directory (meta.json and .bin files)")
    parser.add_argument("--tolerance", type=float, default=1e-9,
                        help="largest relative error of the loss and of each gradient tensor (default 1e-9)")
    parser.add_argument("--tie-margin", type=float, default=0.0,
                        help="a selection may differ from ours only where it is a top-k within this margin of "
                             "the biased logits (default 0: it must match exactly)")
    parser.add_argument("--mutate", choices=sorted(MUTATIONS), help="break the oracle on purpose (self-test)")
    args = parser.parse_args()

    try:
        import torch
    except ImportError:
        print("skipped: PyTorch is not installed")
        return 77

    checks = Checks()
    try:
        dump = read_dump(args.dir, torch)
    except (OSError, ValueError, KeyError, TypeError) as e:
        checks.record(False, "read dump %s" % args.dir, str(e))
        return checks.summary()
    c = dump["config"]
    print("dump %s: %s, producer: %s" % (args.dir, c["ffn"], dump["producer"]))
    print("config: T %d d %d L %d n_head %d V %d (Vp %d) H %d dh %d E %d fe %d k %d B %d" % tuple(
        c[key] for key in ("T", "d", "L", "n_head", "V", "Vp", "H", "dh", "E", "fe", "k", "B")))
    if args.mutate:
        print("MUTATED oracle (%s): %s; the checks below should fail" % (args.mutate, MUTATIONS[args.mutate]))

    problems = layout_problems(c, dump["tensors"], dump["num_params"])
    checks.record(not problems, "parameter layout matches SPEC §2", "; ".join(problems))
    if problems:
        return checks.summary()

    model = OracleModel(torch, c, dump, args.mutate)
    loss = model.loss()
    loss.backward()

    check_selection(checks, torch, model, dump, args.tie_margin)

    dumped_loss = dump["loss"]
    ours = loss.item()
    if dumped_loss is None:
        checks.record(False, "loss", "the dump's loss is not a finite number")
    else:
        err = abs(ours - dumped_loss) / max(abs(ours), 1e-300)
        checks.record(err <= args.tolerance, "loss %.15g (dump %.15g)" % (ours, dumped_loss), "rel err %.2e" % err,
                      err)

    worst = {}
    for spec in dump["tensors"]:
        name = spec["name"]
        ours = model.params[name].grad.reshape(-1)
        theirs = dump["grads"][spec["offset"]:spec["offset"] + spec["numel"]]
        norm = ours.norm().item()
        diff = (ours - theirs).norm().item()
        err = diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)
        label = "grad %-20s %-16s |g| %.3e" % (name, tuple(spec["shape"]), norm)
        checks.record(err <= args.tolerance, label, "rel err %.2e" % err, err)
        group = name.split(".", 1)[-1]
        worst[group] = max(worst.get(group, 0.0), err)
    print("worst relative error by tensor group: " +
          ", ".join("%s %.2e" % (group, err) for group, err in sorted(worst.items())))
    return checks.summary()


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def record(self, ok, what, detail="", err=None):
        ok = bool(ok) and (err is None or math.isfinite(err))  # NaN never passes
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        print("%s %s%s" % ("ok     " if ok else "FAILED ", what, ("  " + detail) if detail else ""))

    def summary(self):
        print("%d passed, %d failed" % (self.passed, self.failed))
        return 0 if self.failed == 0 else 1


# ------------------------------------------------------------------------------------------------
# Reading a dump

def read_dump(directory, torch):
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    if meta.get("format") != "lmoe-model-dump" or meta.get("version") != 1:
        raise ValueError("not a version-1 lmoe model dump")
    for key in ("ffn", "T", "d", "L", "n_head", "V", "Vp", "H", "dh", "E", "fe", "k", "B"):
        if key not in meta["config"]:
            raise KeyError("meta.json: config has no " + key)
    if meta["loss"] is not None and not isinstance(meta["loss"], (int, float)):
        raise ValueError("meta.json: the loss is not a number")
    if sys.byteorder != "little":
        raise ValueError("dumps are little-endian; this host is not")
    dtypes = {"float32": torch.float32, "float64": torch.float64, "int32": torch.int32}
    arrays = {}
    for key, info in meta["files"].items():
        path = os.path.join(directory, info["file"])
        with open(path, "rb") as f:
            raw = f.read()
        dtype = dtypes[info["dtype"]]
        count = math.prod(info["shape"])
        itemsize = torch.tensor([], dtype=dtype).element_size()
        if len(raw) != count * itemsize:
            raise ValueError("%s holds %d bytes, expected %d (%s %s)" % (path, len(raw), count * itemsize,
                                                                       info["dtype"], info["shape"]))
        tensor = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.zeros(0, dtype=dtype)
        arrays[key] = tensor.reshape(info["shape"])
    return {
        "config": meta["config"],
        "producer": meta.get("producer", ""),
        "loss": meta["loss"],
        "num_params": meta["num_params"],
        "tensors": meta["tensors"],
        "params": arrays["params"].double(),
        "grads": arrays["grads"].double(),
        "tokens": arrays["tokens"].long(),
        "targets": arrays["targets"].long(),
        "sel": arrays["sel"].long(),                     # (L, H, N, k)
        "routing_bias": arrays["routing_bias"].double(),  # (L, H, E)
    }


def expected_shapes(c):
    """Every parameter tensor of SPEC §2 and its shape, by the layout's names."""
    d, Vp, L = c["d"], c["Vp"], c["L"]
    attn = c["d"] // c["n_head"] * c["n_head"]
    shapes = {"wte": [Vp, d], "lnf": [d], "lm_head": [Vp, d]}
    for l in range(L):
        p = "layer%d." % l
        shapes[p + "ln1"] = [d]
        shapes[p + "qkv"] = [3 * attn, d]
        shapes[p + "attn_out"] = [d, attn]
        shapes[p + "ln2"] = [d]
        if c["ffn"] == "latentmoe":
            H, dh, E, fe = c["H"], c["dh"], c["E"], c["fe"]
            shapes[p + "ffn_in"] = [H * dh, d]
            shapes[p + "ffn_out"] = [d, H * dh]
            shapes[p + "router"] = [H, dh, E]
            shapes[p + "expert_in"] = [H, E, fe, dh]
            shapes[p + "expert_out"] = [H, E, fe, dh]
        else:
            E, f = c["E"], c["fe"]
            shapes[p + "router"] = [d, E]
            shapes[p + "expert_in"] = [E, f, d]
            shapes[p + "expert_out"] = [E, d, f]
    return shapes


def layout_problems(c, tensors, num_params):
    problems = []
    if c["ffn"] not in ("latentmoe", "moe"):
        return ["unknown ffn kind %r" % c["ffn"]]
    if c["Vp"] != (c["V"] + 127) // 128 * 128 or c["d"] % c["n_head"] or (c["d"] // c["n_head"]) % 2:
        problems.append("inconsistent config (Vp, or d / n_head not an even integer)")
    if c["ffn"] == "moe" and (c["H"] != 1 or c["dh"] != c["d"]):
        problems.append("the MoE needs H = 1 and dh = d")
    want = expected_shapes(c)
    got = {t["name"]: t for t in tensors}
    for name in sorted(set(want) - set(got)):
        problems.append("missing tensor " + name)
    for name in sorted(set(got) - set(want)):
        problems.append("unexpected tensor " + name)
    for name in sorted(set(want) & set(got)):
        t = got[name]
        if list(t["shape"]) != want[name] or t["numel"] != math.prod(want[name]):
            problems.append("%s has shape %s, SPEC says %s" % (name, t["shape"], want[name]))
    spans = sorted((t["offset"], t["offset"] + t["numel"], t["name"]) for t in tensors)
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            problems.append("%s starts at %d, not where the previous tensor ends (%d)" % (name, begin, end))
        end = stop
    if end != num_params:
        problems.append("tensors cover %d elements, the dump has %d" % (end, num_params))
    return problems


# ------------------------------------------------------------------------------------------------
# The model of SPEC §2

class OracleModel:
    def __init__(self, torch, c, dump, mutate):
        self.torch, self.c, self.dump, self.mutate = torch, c, dump, mutate
        self.params = {}
        for t in dump["tensors"]:
            flat = dump["params"][t["offset"]:t["offset"] + t["numel"]]
            self.params[t["name"]] = flat.reshape(t["shape"]).clone().requires_grad_(True)
        self.router_logits = []  # per layer: (N, H, E) unbiased logits s, kept for the selection check

    # RMSNorm(x; g) = g ⊙ x / sqrt(mean(x²) + 1e-5)
    def rmsnorm(self, x, g):
        return g * x / self.torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-5)

    # exact GELU: 0.5·x·(1 + erf(x/√2))
    def gelu(self, x):
        torch = self.torch
        if self.mutate == "tanh-gelu":
            return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    # x: (B, T, heads, da). Pair (2i, 2i+1) at position pos turns by pos·10000^(−2i/da).
    def rotary(self, x):
        torch = self.torch
        B, T, heads, da = x.shape
        pos = torch.arange(T, dtype=torch.float64)
        i = torch.arange(da // 2, dtype=torch.float64)
        angle = pos[:, None] * torch.pow(torch.tensor(10000.0, dtype=torch.float64), -2 * i / da)  # (T, da/2)
        cos = torch.cos(angle)[None, :, None, :]
        sin = torch.sin(angle)[None, :, None, :]
        if self.mutate == "rope-half-split":
            a, b = x[..., :da // 2], x[..., da // 2:]
            return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
        pairs = x.reshape(B, T, heads, da // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(B, T, heads, da)

    # causal softmax attention with rotary q, k; x: (N, d) normalised input
    def attention(self, x, W_qkv, W_o):
        torch, c = self.torch, self.c
        B, T, nh = c["B"], c["T"], c["n_head"]
        da = c["d"] // nh
        qkv = (x @ W_qkv.T).reshape(B, T, 3, nh, da)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, nh, da)
        q, k = self.rotary(q), self.rotary(k)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # (B, nh, T, da)
        scores = q @ k.transpose(-1, -2) / math.sqrt(da)       # (B, nh, T, T)
        future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        probs = torch.softmax(scores.masked_fill(future, -math.inf), dim=-1)
        o = (probs @ v).permute(0, 2, 1, 3).reshape(B * T, nh * da)
        return o @ W_o.T

    # One routed group: rows x (N, D), logits s (N, E), chosen experts S (N, k); experts
    # W_in (E, F, D) and W_out (E, F, D) with y = Σ_j w_j · W_out[S_j]^T GELU(W_in[S_j] x).
    def routed(self, x, s, S, bias, W_in, W_out):
        torch = self.torch
        scores = s + bias if self.mutate == "gates-with-bias" else s
        gates = torch.softmax(torch.gather(scores, 1, S), dim=-1)  # (N, k), softmax over the chosen experts
        y = torch.zeros_like(x)
        for e in range(W_in.shape[0]):
            rows, slots = (S == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            hidden = self.gelu(x[rows] @ W_in[e].T)              # (m, F)
            out = hidden @ W_out[e]                               # (m, D)
            y = y.index_add(0, rows, gates[rows, slots][:, None] * out)
        return y

    def router_matrix(self, R):
        # R: (..., D, E). The mutation reads the same numbers as (..., E, D), a transposed-storage bug.
        if self.mutate == "transposed-router":
            return R.reshape(*R.shape[:-2], R.shape[-1], R.shape[-2]).transpose(-1, -2)
        return R

    def ffn(self, l, x):
        c, p, torch = self.c, self.params, self.torch
        pre = "layer%d." % l
        sel = self.dump["sel"][l]            # (H, N, k)
        bias = self.dump["routing_bias"][l]  # (H, E)
        N = x.shape[0]
        if c["ffn"] == "moe":
            s = x @ self.router_matrix(p[pre + "router"])  # (N, E)
            self.router_logits.append(s.detach()[:, None, :])
            W_out = p[pre + "expert_out"].transpose(1, 2)   # W2 (E, d, f) -> (E, f, d)
            return self.routed(x, s, sel[0], bias[0], p[pre + "expert_in"], W_out)
        H, dh = c["H"], c["dh"]
        u = (x @ p[pre + "ffn_in"].T).reshape(N, H, dh)
        R = self.router_matrix(p[pre + "router"])           # (H, dh, E)
        s = torch.einsum("nhd,hde->nhe", u, R)              # (N, H, E)
        self.router_logits.append(s.detach())
        K, V = p[pre + "expert_in"], p[pre + "expert_out"]  # (H, E, fe, dh)
        y = torch.stack([self.routed(u[:, h], s[:, h], sel[h], bias[h], K[h], V[h]) for h in range(H)], dim=1)
        return y.reshape(N, H * dh) @ p[pre + "ffn_out"].T

    def loss(self):
        c, p, torch = self.c, self.params, self.torch
        x = p["wte"][self.dump["tokens"]]  # (N, d); token ids index rows, no positional embedding
        for l in range(c["L"]):
            pre = "layer%d." % l
            x = x + self.attention(self.rmsnorm(x, p[pre + "ln1"]), p[pre + "qkv"], p[pre + "attn_out"])
            x = x + self.ffn(l, self.rmsnorm(x, p[pre + "ln2"]))
        logits = self.rmsnorm(x, p["lnf"]) @ p["lm_head"].T  # (N, Vp)
        if self.mutate != "padded-vocab-counts":
            logits = logits[:, :c["V"]]                       # padded logits never count
        targets = self.dump["targets"]
        nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None])[:, 0]
        return nll.mean()


# ------------------------------------------------------------------------------------------------
# The dumped selection against our own top-k of s + b

def check_selection(checks, torch, model, dump, tie_margin):
    c = model.c
    k, E = c["k"], c["E"]
    sel = dump["sel"]  # (L, H, N, k)
    valid = bool(((sel >= 0) & (sel < E)).all())
    if valid:
        ordered = sel.sort(dim=-1).values
        valid = bool((ordered[..., 1:] != ordered[..., :-1]).all())
    checks.record(valid, "selection: every row holds k = %d distinct expert ids in [0, %d)" % (k, E))
    if not valid:
        return

    rows = differ = near_ties = bias_mattered = 0
    worst_violation = -math.inf
    for l, s in enumerate(model.router_logits):
        s = s.permute(1, 0, 2)                            # (H, N, E)
        biased = s + dump["routing_bias"][l][:, None, :]
        ours = top_k_lower_index_first(torch, s if model.mutate == "selection-without-bias" else biased, k)
        theirs = sel[l]
        same = (ours.sort(dim=-1).values == theirs.sort(dim=-1).values).all(dim=-1)  # (H, N)
        unbiased = top_k_lower_index_first(torch, s, k)
        bias_mattered += int((unbiased.sort(dim=-1).values != ours.sort(dim=-1).values).any(dim=-1).sum())
        # violation: how far the best expert outside the dumped set outscores the worst one inside it
        # (< 0 for a strict top-k, 0 at an exact tie, > 0 when the dumped set is not a top-k of s + b)
        chosen = torch.zeros_like(biased, dtype=torch.bool).scatter_(2, theirs, True)
        violation = (biased.masked_fill(chosen, -math.inf).max(dim=-1).values -
                     biased.masked_fill(~chosen, math.inf).min(dim=-1).values)
        rows += same.numel()
        differ += int((~same).sum())
        if bool((~same).any()):
            worst_violation = max(worst_violation, violation[~same].max().item())
            near_ties += int(((~same) & (violation <= tie_margin)).sum()) if tie_margin > 0 else 0
    detail = "%d of %d rows differ from our top-k of s + b" % (differ, rows)
    if differ:
        detail += " (%d within the tie margin %g; worst violation %.3e)" % (near_ties, tie_margin, worst_violation)
    print("info   the routing bias changes the selection of %d of %d rows" % (bias_mattered, rows))
    checks.record(differ == near_ties, "selection agrees with our top-k", detail)


def top_k_lower_index_first(torch, scores, k):
    # A stable ascending sort of −score puts higher scores first and keeps equal scores in index order.
    return torch.sort(-scores, dim=-1, stable=True).indices[..., :k]


if __name__ == "__main__":
    sys.exit(main())
