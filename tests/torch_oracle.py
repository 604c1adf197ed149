#!/usr/bin/env python3
"""Independent oracle (SPEC §8.3): recomputes one training step of a model dump with PyTorch autograd.

    python3 tests/torch_oracle.py DIR [--tolerance X] [--tie-margin M] [--mutate NAME]

DIR is a dump written by tests/model_dump.h (meta.json + raw little-endian .bin files). The model is
model.py at the repository root, written from SPEC §2 alone; it runs here in float64 on the CPU and shares
no code with the C++ reference or the GPU kernels; autograd supplies every gradient. Checked, one line each:
  - the parameter layout: every tensor SPEC §2 implies, with its shape, and nothing else;
  - the dumped expert selection: valid ids, k distinct experts per row, and the same sets as our own
    top-k of s + b (LocMoE: of the GrAP gate p; ties to the lower index). With --tie-margin M > 0 (GPU
    dumps) a row may differ when the dumped set is still a top-k within M, i.e. a near-tie. The gradients
    always use the dumped selection, so a near-tie flip cannot spoil them;
  - LocMoE (SPEC §2.6): no routing bias; p_δ (relative error at most 1e-9), ec_min and the capacity C
    from the dump's flags; which copies the capacity kept, from the dumped selection in the spec's
    order, and the rows dropped per layer, exactly;
  - the loss (with LocMoE also its parts: the cross-entropy and L_aux and L_loc over the layers) and the
    gradient of every parameter tensor: relative error |ours - dump| / |ours| (2-norm) must be at most
    --tolerance (default 1e-9: double against double); L_aux's and L_loc's error is taken relative to at
    least their weights α and μ (near balance they are small differences of terms that size).
Prints "N passed, M failed" last. Exit 0 if all passed, 1 if any failed, 77 if PyTorch is missing.

Conventions that SPEC §2 leaves to the layout (tensor names and shapes come from meta.json):
  - W_qkv rows are [q | k | v], each n_head·d_attn wide, head h at rows h·d_attn of its part;
  - expert tensors: LatentMoE R (H, dh, E), K and V (H, E, fe, dh); MoE R (d, E) (LocMoE: ε (E)),
    W1 (E, f, d), W2 (E, d, f);
  - wte and lm_head have Vp = roundup(V, 128) rows; rows >= V are padding that must never count.

--mutate NAME deliberately breaks this model in one way (see MUTATIONS) to show the check can fail:
tests/test_torch_oracle.sh expects every mutation to be caught.
"""
import argparse
import dataclasses
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: model.py
try:
    import torch
except ImportError:  # main() reports the skip
    torch = None
    Model = object
else:
    from model import (Config, Model, capacity_bound, expert_capacity, locality_target, param_shapes,
                       topk_lower_index_first)

# Deliberate mistakes, each a bug a real implementation could have. The oracle must FAIL under each.
MUTATIONS = {
    "selection-without-bias": "choose the top-k of s instead of s + b",
    "gates-with-bias": "softmax the gates over s + b instead of the unbiased s",
    "tanh-gelu": "use the tanh approximation of GELU",
    "transposed-router": "read each router matrix as (E, D) instead of (D, E)",
    "rope-half-split": "rotate pairs (i, i + d_attn/2) instead of adjacent pairs (2i, 2i+1)",
    "padded-vocab-counts": "let the padded logits (>= V) into the softmax",
    # LocMoE's (SPEC §2.6)
    "gate-softmax-over-k": "take LocMoE's gates from a softmax over the k chosen experts, not over all E",
    "grap-sum-pooling": "pool each GrAP group by its sum instead of its mean (Ω without the factor E/d)",
    "capacity-drop-earliest": "drop the earliest tokens over capacity first instead of the latest",
    "kl-reversed": "compute L_loc as μ·KL(D_l ‖ P) instead of μ·KL(P ‖ D_l)",
    "locality-uniform": "take D_l uniform over all E instead of the rank's node target",
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

    if torch is None:
        print("skipped: PyTorch is not installed")
        return 77

    checks = Checks()
    try:
        dump = read_dump(args.dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        checks.record(False, "read dump %s" % args.dir, str(e))
        return checks.summary()
    c = dump["config"]
    print("dump %s: %s, producer: %s" % (args.dir, c["ffn"], dump["producer"]))
    print("config: T %d d %d L %d n_head %d V %d (Vp %d) H %d dh %d E %d fe %d k %d B %d, %s router" % tuple(
        c[key] for key in ("T", "d", "L", "n_head", "V", "Vp", "H", "dh", "E", "fe", "k", "B", "router")))
    if c["router"] == "locmoe":
        print("LocMoE: c_f %.9g delta %.9g alpha %.9g mu %.9g, rank %d of %d in nodes of %d" % tuple(
            c[key] for key in LOCMOE_CONFIG))
    if args.mutate:
        print("MUTATED oracle (%s): %s; the checks below should fail" % (args.mutate, MUTATIONS[args.mutate]))

    problems = layout_problems(c, dump["tensors"], dump["num_params"])
    checks.record(not problems, "parameter layout matches SPEC §2", "; ".join(problems))
    if problems:
        return checks.summary()

    model = OracleModel(model_config(c), dump, args.mutate)
    B, T = c["B"], c["T"]
    cross_entropy, aux_loss, loc_loss = model.losses(dump["tokens"].reshape(B, T), dump["targets"].reshape(B, T),
                                                     dump["routing_bias"], dump["sel"])
    loss = cross_entropy + aux_loss + loc_loss
    loss.backward()

    check_selection(checks, model, dump, args.tie_margin)
    if c["router"] == "locmoe":
        check_locmoe_routing(checks, model, dump)

    # (name, ours, theirs, the least scale of the error): L_aux and L_loc are sums of terms of size α and
    # μ that cancel near balance or near D_l (L_loc is 0 at P = D_l), so their error is taken relative to
    # at least their weight, the size of the rounding a float32 producer makes in them
    parts = [("loss", loss, dump["loss"], 1e-300)]
    if c["router"] == "locmoe":
        parts += [("cross_entropy", cross_entropy, dump["locmoe"]["cross_entropy"], 1e-300),
                  ("aux_loss", aux_loss, dump["locmoe"]["aux_loss"], c["aux_loss_weight"]),
                  ("loc_loss", loc_loss, dump["locmoe"]["loc_loss"], c["loc_loss_weight"])]
    for name, ours, theirs, scale in parts:
        ours = ours.item()
        if theirs is None:
            checks.record(False, name, "the dump's %s is not a finite number" % name)
            continue
        err = abs(ours - theirs) / max(abs(ours), scale, 1e-300)
        checks.record(err <= args.tolerance, "%s %.15g (dump %.15g)" % (name, ours, theirs), "rel err %.2e" % err,
                      err)

    worst = {}
    for spec in dump["tensors"]:
        name = spec["name"]
        ours = model.leaves[name].grad.reshape(-1)
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

LOCMOE_CONFIG = ("capacity_factor", "capacity_delta", "aux_loss_weight", "loc_loss_weight", "rank", "world",
                 "node_size")
LOCMOE_RESULTS = ("p_delta", "ec_min", "capacity", "cross_entropy", "aux_loss", "loc_loss", "dropped")


def read_dump(directory):
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    if meta.get("format") != "lmoe-model-dump" or meta.get("version") != 2:
        raise ValueError("not a version-2 lmoe model dump")
    config = meta["config"]
    for key in ("ffn", "router", "T", "d", "L", "n_head", "V", "Vp", "H", "dh", "E", "fe", "k", "B"):
        if key not in config:
            raise KeyError("meta.json: config has no " + key)
    locmoe = config["router"] == "locmoe"
    for key in LOCMOE_CONFIG if locmoe else ():
        if key not in config:
            raise KeyError("meta.json: a LocMoE config has no " + key)
    for key in LOCMOE_RESULTS if locmoe else ():
        if key not in meta.get("locmoe", {}):
            raise KeyError("meta.json: a LocMoE dump's locmoe object has no " + key)
    numbers = [meta["loss"]] + ([meta["locmoe"][key] for key in LOCMOE_RESULTS[:-1]] if locmoe else [])
    if any(x is not None and not isinstance(x, (int, float)) for x in numbers):
        raise ValueError("meta.json: the loss or a LocMoE figure is not a number")
    if locmoe and len(meta["locmoe"]["dropped"]) != config["L"]:
        raise ValueError("meta.json: LocMoE's dropped has not one count per layer")
    if locmoe and "kept" not in meta["files"]:
        raise KeyError("meta.json: a LocMoE dump has no kept file")
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
        "config": config,
        "producer": meta.get("producer", ""),
        "loss": meta["loss"],
        "locmoe": meta.get("locmoe"),
        "kept": arrays["kept"].bool() if locmoe else None,  # (L, H, N, k)
        "num_params": meta["num_params"],
        "tensors": meta["tensors"],
        "params": arrays["params"].double(),
        "grads": arrays["grads"].double(),
        "tokens": arrays["tokens"].long(),
        "targets": arrays["targets"].long(),
        "sel": arrays["sel"].long(),                     # (L, H, N, k)
        "routing_bias": arrays["routing_bias"].double(),  # (L, H, E)
    }


def model_config(c):
    """model.py's Config from the dump's configuration (the top-k routers' dumps have no LocMoE fields)."""
    return Config(**{f.name: c[f.name] for f in dataclasses.fields(Config) if f.name in c})


def expected_shapes(c):
    """Every parameter tensor of SPEC §2 and its shape, by the layout's names (model.py's param_shapes)."""
    return param_shapes(model_config(c))


def layout_problems(c, tensors, num_params):
    problems = []
    if c["ffn"] not in ("latentmoe", "moe"):
        return ["unknown ffn kind %r" % c["ffn"]]
    if c["Vp"] != (c["V"] + 127) // 128 * 128 or c["d"] % c["n_head"] or (c["d"] // c["n_head"]) % 2:
        problems.append("inconsistent config (Vp, or d / n_head not an even integer)")
    if c["ffn"] == "moe" and (c["H"] != 1 or c["dh"] != c["d"]):
        problems.append("the MoE needs H = 1 and dh = d")
    if c["router"] not in ("topk", "locmoe") or (c["router"] == "locmoe" and c["ffn"] != "moe"):
        problems.append("router %r with ffn %r: LocMoE routes the MoE only" % (c["router"], c["ffn"]))
    if c["router"] == "locmoe" and (c["d"] % c["E"] or c["world"] < 1 or c["E"] % c["world"] or
                                    c["node_size"] < 1 or c["world"] % c["node_size"] or
                                    not 0 <= c["rank"] < c["world"]):
        problems.append("inconsistent LocMoE config (d % E, E % world, world % node_size, rank < world)")
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
# The model of SPEC §2 (model.py) on the dump's weights, optionally with one deliberate mistake

class OracleModel(Model):
    def __init__(self, cfg, dump, mutate):
        self.mutate = mutate
        self.leaves = {}  # the dump's weights as autograd leaves: their .grad is what gets compared
        for t in dump["tensors"]:
            flat = dump["params"][t["offset"]:t["offset"] + t["numel"]]
            self.leaves[t["name"]] = flat.reshape(t["shape"]).clone().requires_grad_(True)
        params = dict(self.leaves)
        if mutate == "transposed-router":  # the same numbers read as (..., E, D): a transposed-storage bug
            for name, R in self.leaves.items():
                if name.endswith(".router"):
                    params[name] = R.reshape(*R.shape[:-2], R.shape[-1], R.shape[-2]).transpose(-1, -2)
        if mutate == "padded-vocab-counts":  # a vocabulary as wide as the padded one: no logit is dropped
            cfg = dataclasses.replace(cfg, V=cfg.Vp)
        if mutate == "locality-uniform":  # one rank: its D_l is uniform
            cfg = dataclasses.replace(cfg, rank=0, world=1, node_size=1)
        super().__init__(cfg, params)
        self.bias = dump["routing_bias"]
        self.routed_logits = []  # every route() call's unbiased logits (M, E): layer by layer, head by head
        self.gate_probs = []     # LocMoE: every layer's GrAP probabilities p (N, E)
        self.kept = []           # LocMoE: every layer's copies the capacity kept (N, k)

    def gelu(self, x):
        if self.mutate == "tanh-gelu":
            return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))
        return super().gelu(x)

    def rotary(self, x):
        if self.mutate == "rope-half-split":
            B, T, heads, da = x.shape
            pos = torch.arange(T, dtype=torch.float64)
            i = torch.arange(da // 2, dtype=torch.float64)
            angle = pos[:, None] * torch.pow(torch.tensor(10000.0, dtype=torch.float64), -2 * i / da)
            cos = torch.cos(angle)[None, :, None, :]
            sin = torch.sin(angle)[None, :, None, :]
            a, b = x[..., :da // 2], x[..., da // 2:]
            return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
        return super().rotary(x)

    def route(self, s, bias, sel=None):
        self.routed_logits.append(s.detach())
        if self.mutate == "gates-with-bias":
            return sel, torch.softmax(torch.gather(s + bias, 1, sel), dim=-1)
        return super().route(s, bias, sel)

    def grap(self, x, eps):
        if self.mutate == "grap-sum-pooling":  # x Ω^T times d/E: the group sums
            x = x * (self.cfg.d // self.cfg.E)
        p = super().grap(x, eps)
        self.gate_probs.append(p.detach())
        return p

    def capacity_keep(self, S, C):
        if self.mutate == "capacity-drop-earliest":  # the spec's rule on the tokens in reverse order
            kept = super().capacity_keep(S.flip(0), C).flip(0)
        else:
            kept = super().capacity_keep(S, C)
        self.kept.append(kept)
        return kept

    def locmoe_gates(self, p, S):
        if self.mutate == "gate-softmax-over-k":  # log p = g − logsumexp(g): this is softmax over S of g
            return torch.softmax(torch.log(torch.gather(p, 1, S)), dim=-1)
        return super().locmoe_gates(p, S)

    def router_losses(self, p, S):
        aux, loc = super().router_losses(p, S)
        if self.mutate == "kl-reversed":
            D, P = locality_target(self.cfg), p.mean(dim=0)
            loc = self.cfg.loc_loss_weight * (D * torch.log(D / P)).sum()
        return aux, loc

    def router_logits(self, l):
        """Layer l's unbiased logits s, (H, N, E) (the top-k routers)."""
        H = self.cfg.H
        return torch.stack(self.routed_logits[l * H:(l + 1) * H])

    def selection_scores(self, l):
        """Layer l's scores (H, N, E) whose top-k the selection must be: s + b per head, or LocMoE's p."""
        if self.cfg.router == "locmoe":
            return self.gate_probs[l][None]
        s = self.router_logits(l)
        return s if self.mutate == "selection-without-bias" else s + self.bias[l][:, None, :]


# ------------------------------------------------------------------------------------------------
# The dumped selection against our own top-k

def check_selection(checks, model, dump, tie_margin):
    c = dump["config"]
    k, E = c["k"], c["E"]
    sel = dump["sel"]  # (L, H, N, k)
    valid = bool(((sel >= 0) & (sel < E)).all())
    if valid:
        ordered = sel.sort(dim=-1).values
        valid = bool((ordered[..., 1:] != ordered[..., :-1]).all())
    checks.record(valid, "selection: every row holds k = %d distinct expert ids in [0, %d)" % (k, E))
    if not valid:
        return

    rows = differ = near_ties = tied = bias_mattered = 0
    worst_violation = -math.inf
    for l in range(c["L"]):
        scores = model.selection_scores(l)                # (H, N, E)
        ours = topk_lower_index_first(scores, k)
        theirs = sel[l]
        same = (ours.sort(dim=-1).values == theirs.sort(dim=-1).values).all(dim=-1)  # (H, N)
        if c["router"] == "topk":
            unbiased = topk_lower_index_first(model.router_logits(l), k)
            bias_mattered += int((unbiased.sort(dim=-1).values != ours.sort(dim=-1).values).any(dim=-1).sum())
        # violation: how far the best expert outside the dumped set outscores the worst one inside it
        # (< 0 for a strict top-k, 0 at an exact tie, > 0 when the dumped set is not a top-k of the scores)
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, theirs, True)
        violation = (scores.masked_fill(chosen, -math.inf).max(dim=-1).values -
                     scores.masked_fill(~chosen, math.inf).min(dim=-1).values)
        tied += int((violation == 0).sum())
        rows += same.numel()
        differ += int((~same).sum())
        if bool((~same).any()):
            worst_violation = max(worst_violation, violation[~same].max().item())
            near_ties += int(((~same) & (violation <= tie_margin)).sum()) if tie_margin > 0 else 0
    what = "the GrAP gate p" if c["router"] == "locmoe" else "s + b"
    detail = "%d of %d rows differ from our top-k of %s" % (differ, rows, what)
    if differ:
        detail += " (%d within the tie margin %g; worst violation %.3e)" % (near_ties, tie_margin, worst_violation)
    if c["router"] == "topk":
        print("info   the routing bias changes the selection of %d of %d rows" % (bias_mattered, rows))
    print("info   %d of %d rows choose between exactly tied scores (ties go to the lower index)" % (tied, rows))
    checks.record(differ == near_ties, "selection agrees with our top-k", detail)


# ------------------------------------------------------------------------------------------------
# LocMoE's capacity and drops (SPEC §2.6) against ours, from the dump's flags and selection

def check_locmoe_routing(checks, model, dump):
    c, theirs = dump["config"], dump["locmoe"]
    N = c["B"] * c["T"]
    checks.record(bool((dump["routing_bias"] == 0).all()), "routing bias is zero (LocMoE has none)")

    p_delta, ec_min = capacity_bound(model.cfg)
    if theirs["p_delta"] is None:
        checks.record(False, "p_delta", "the dump's p_delta is not a finite number")
    else:
        err = abs(p_delta - theirs["p_delta"]) / p_delta
        checks.record(err <= 1e-9, "p_delta %.15g (dump %.15g)" % (p_delta, theirs["p_delta"]), "rel err %.2e" % err,
                      err)
    checks.record(ec_min == theirs["ec_min"], "ec_min %d (dump %s)" % (ec_min, theirs["ec_min"]))
    C = expert_capacity(model.cfg, N)
    checks.record(C == theirs["capacity"], "capacity C %d rows per expert, 0 for unlimited (dump %d)" % (
        C, theirs["capacity"]))

    ours = torch.stack(model.kept)                       # (L, N, k), from the dumped selection
    kept = dump["kept"][:, 0]                            # (L, N, k)
    differ = int((ours != kept).sum())
    checks.record(differ == 0, "kept copies agree with ours (the latest tokens dropped first)",
                  "%d of %d copies differ" % (differ, ours.numel()))
    dropped = [int((~layer).sum()) for layer in ours]
    checks.record(dropped == list(theirs["dropped"]), "rows dropped per layer %s (dump %s)" % (
        dropped, theirs["dropped"]))
    print("info   %d of %d tokens have every copy dropped (their FFN output is zero)" % (
        int((~ours).all(dim=-1).sum()), c["L"] * N))


if __name__ == "__main__":
    sys.exit(main())
