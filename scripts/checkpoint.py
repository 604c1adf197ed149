#!/usr/bin/env python3
"""Reads the trainers' checkpoints (train/checkpoint.h, format versions 2 and 3) outside C++.

    python3 scripts/checkpoint.py CKPT                      prints the header and the tensor table
    python3 scripts/checkpoint.py CKPT --val-data SHARD [--batches N]
                                                            the validation loss of model.py on the
                                                            checkpoint's weights, over the batches the
                                                            trainer's --eval-batches N uses
    python3 scripts/checkpoint.py CKPT --state-dict OUT.pt  a PyTorch state dict of the weights

The model's shape (FFN kind, d, L, attn-heads, V, latent-heads, head-dim, experts, expert-dim, topk) and
the run's B and T come from the checkpoint's header. --preset and the trainers' model flags are optional:
when given they are checked against the header, the way a trainer refuses a checkpoint of another model.

Reading needs numpy only (read_checkpoint, split_params); torch is imported where the model is built
(load_model, the loss and the state dict). The format and the parameter layout are in docs/checkpoint.md.
Exit status: 0 done, 1 a bad or unsupported checkpoint or shard, 2 bad flags.
"""
import argparse
import glob
import os
import signal
import sys

try:
    import numpy as np
except ImportError:
    sys.exit("checkpoint.py needs numpy (Debian: python3-numpy; /usr/bin/python3 may have it where a venv lacks it)")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: model.py

MAGIC = 0x4C4D4F45  # "LMOE"
VERSIONS = (2, 3)  # read; the trainers write 3
FINGERPRINT = ("ffn kind", "d", "L", "attn-heads", "V", "latent-heads", "head-dim", "experts", "expert-dim",
               "topk")  # model_fingerprint's order
FFN_KINDS = {0: "latentmoe", 1: "moe"}  # FfnKind's values
FNV_OFFSET, FNV_PRIME, MASK64 = 14695981039346656037, 1099511628211, (1 << 64) - 1
LANE_MULTIPLIER, MIX_K1, MIX_K2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # LaneHash64's
LANES, LANE_ROWS = 4, 8192  # rows of 4 words hashed per numpy step (256 KiB arrays stay in the cache)
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256

# model/config.h's presets: (T, d, L, n_head, (H, dh, E, fe, k) of LatentMoE, (E, f, k) of the MoE, B)
PRESETS = {
    "tiny": (32, 64, 2, 4, (4, 16, 8, 32, 2), (8, 32, 2), 16),
    "small": (256, 512, 6, 8, (8, 64, 32, 256, 4), (32, 256, 4), 16),
    "p1": (1024, 1024, 12, 8, (8, 128, 64, 512, 8), (64, 512, 8), 8),
    "p2": (1024, 1024, 12, 8, (8, 128, 128, 256, 16), (128, 256, 16), 8),
}


class CheckpointError(Exception):
    """A file that is not a readable checkpoint (version 2 or 3) of a one-rank run, or one this reader cannot use."""


def fnv1a64(data, h=FNV_OFFSET):
    """FNV-1a 64 of `data` continued from `h`, version 2's checksum: one byte after another, which numpy
    cannot vectorise, so this loop is the slow part of reading a large version-2 checkpoint."""
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return h


def mix64(x):
    """LaneHash64's mix (splitmix64's finalizer) of one int in [0, 2^64)."""
    x ^= x >> 30
    x = (x * MIX_K1) & MASK64
    x ^= x >> 27
    x = (x * MIX_K2) & MASK64
    return x ^ (x >> 31)


def lane_hash64(data):
    """LaneHash64 of `data` (bytes or a memoryview), version 3's checksum (docs/checkpoint.md): the bytes,
    zero-padded to whole little-endian words w_j, word j into lane i = j mod 4 as a_i <- a_i * P + mix(w_j)
    mod 2^64 from a_i = i + 1, then h = n and h = mix(h ^ a_i) for each lane in order. A lane's recurrence
    has the closed form a_i = (i + 1) * P^m + sum_k mix(w_{4k+i}) * P^(m-1-k) over its m words, so a block
    of rows advances all four lanes at once: a <- a * P^rows + sum_r mix(W[r]) * P^(rows-1-r), with
    numpy's uint64 arithmetic, which wraps mod 2^64 as the C++ does."""
    n = len(data)
    words = np.frombuffer(data, "<u8", n // 8)
    rows = words.size // LANES
    u64 = np.uint64
    lanes = np.arange(1, LANES + 1, dtype=u64)
    with np.errstate(over="ignore"):
        # weights[r] = P^(LANE_ROWS-1-r): the last LANE_ROWS - c of them weigh a final block of c rows
        weights = np.ones(LANE_ROWS, u64)
        weights[:-1] = np.cumprod(np.full(LANE_ROWS - 1, LANE_MULTIPLIER, u64))[::-1]
        mixed, shifted = np.empty((LANE_ROWS, LANES), u64), np.empty((LANE_ROWS, LANES), u64)
        for first in range(0, rows, LANE_ROWS):
            c = min(LANE_ROWS, rows - first)
            w, x, t = words[LANES * first:LANES * (first + c)].reshape(c, LANES), mixed[:c], shifted[:c]
            np.right_shift(w, u64(30), out=t)
            np.bitwise_xor(w, t, out=x)
            x *= u64(MIX_K1)
            np.right_shift(x, u64(27), out=t)
            x ^= t
            x *= u64(MIX_K2)
            np.right_shift(x, u64(31), out=t)
            x ^= t
            x *= weights[LANE_ROWS - c:, None]
            lanes = lanes * u64(pow(LANE_MULTIPLIER, c, 1 << 64)) + x.sum(axis=0, dtype=u64)
    lanes = [int(a) for a in lanes]
    rest = [int(w) for w in words[LANES * rows:]]  # the words of a last, partial row ...
    tail = bytes(data[8 * words.size:])
    if tail:  # ... and the last bytes, zero-padded to a word
        rest.append(int.from_bytes(tail + bytes(8 - len(tail)), "little"))
    for i, w in enumerate(rest):
        lanes[i] = (lanes[i] * LANE_MULTIPLIER + mix64(w)) & MASK64
    h = n
    for a in lanes:
        h = mix64(h ^ a)
    return h


def checksum(version, data):
    """The checksum a checkpoint of `version` stores after `data` (the bytes before it, from the file's start)."""
    return fnv1a64(data) if version == 2 else lane_hash64(data)


def read_checkpoint(path, verify_payload=True):
    """The checkpoint at `path` as a dict: version, step, num_params, bias_size, fingerprint (a dict in
    FINGERPRINT's names), B, T, grad_accum, and the float32 arrays params, m, v, routing_bias. Checks what
    load_checkpoint checks that needs no model: magic, version, field count, the header checksum, the
    step's range, the counts, the file size, the whole-file checksum (unless verify_payload is False) and
    the values (finite, v >= 0). Raises CheckpointError naming the problem."""
    if sys.byteorder != "little":
        raise CheckpointError("%s: checkpoints are little-endian; this host is not" % path)
    if not os.path.isfile(path):
        raise CheckpointError("%s: cannot open checkpoint: %s" % (
            path, "not a regular file" if os.path.exists(path) else "no such file"))
    with open(path, "rb") as f:
        data = f.read()
    def fail(why):
        raise CheckpointError("%s: %s" % (path, why))
    if len(data) < 16:
        fail("not a checkpoint of this trainer (shorter than 16 bytes)")
    magic, version = np.frombuffer(data, "<i8", 2)
    if magic != MAGIC:
        fail("not a checkpoint of this trainer (no LMOE magic number at its start)")
    if version not in VERSIONS:
        fail("checkpoint version %d is not supported (this reader reads versions %s)" % (
            version, " and ".join(str(v) for v in VERSIONS)))
    version = int(version)
    if len(data) < 8 * 6:
        fail("checkpoint is truncated (shorter than its header)")
    step, num_params, bias_size, fields = (int(x) for x in np.frombuffer(data, "<i8", 4, 16))
    if fields != len(FINGERPRINT):
        fail("checkpoint header has %d model fields, this reader expects %d (a corrupt or foreign checkpoint)" %
             (fields, len(FINGERPRINT)))
    header_bytes = 8 * (6 + fields + 3)
    if len(data) < header_bytes + 8:
        fail("checkpoint is truncated (shorter than its header)")
    header = np.frombuffer(data, "<i8", 6 + fields + 3)
    stored_header_hash = int(np.frombuffer(data, "<u8", 1, header_bytes)[0])
    if checksum(version, data[:header_bytes]) != stored_header_hash:
        fail("checkpoint is corrupt (checksum mismatch) in its header")
    if not 0 <= step < 2 ** 31:
        fail("checkpoint holds step %d, outside 0 .. 2^31-1 (a corrupt checkpoint)" % step)
    if num_params < 0 or bias_size < 0:
        fail("checkpoint holds a negative count (%d parameters, %d routing biases)" % (num_params, bias_size))
    expected = header_bytes + 8 + 4 * (3 * num_params + bias_size) + 8
    if len(data) != expected:
        fail("checkpoint %s (%d bytes, its header promises %d)" % (
            "is truncated" if len(data) < expected else "has trailing bytes", len(data), expected))
    if verify_payload:
        stored = int(np.frombuffer(data, "<u8", 1, expected - 8)[0])
        # version 2's FNV-1a state after the header is the header checksum verified above
        computed = (fnv1a64(data[header_bytes:expected - 8], stored_header_hash) if version == 2 else
                    lane_hash64(memoryview(data)[:expected - 8]))
        if computed != stored:
            fail("checkpoint is corrupt (checksum mismatch)")
    payload = np.frombuffer(data, "<f4", 3 * num_params + bias_size, header_bytes + 8)
    params, m, v, routing_bias = (payload[:num_params], payload[num_params:2 * num_params],
                                  payload[2 * num_params:3 * num_params], payload[3 * num_params:])
    for values, what in ((params, "parameters"), (m, "first moment (AdamW m)"), (v, "second moment (AdamW v)"),
                         (routing_bias, "routing biases")):
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            fail("checkpoint has a non-finite value (%g) in its %s at index %d" % (values[bad[0]], what, bad[0]))
    negative = np.flatnonzero(v < 0)
    if negative.size:
        fail("checkpoint has a negative value (%g) in its second moment (AdamW v) at index %d" %
             (v[negative[0]], negative[0]))
    B, T, grad_accum = (int(x) for x in header[6 + fields:])
    return {"path": path, "version": version, "step": step, "num_params": num_params, "bias_size": bias_size,
            "fingerprint": dict(zip(FINGERPRINT, (int(x) for x in header[6:6 + fields]))),
            "B": B, "T": T, "grad_accum": grad_accum,
            "params": params, "m": m, "v": v, "routing_bias": routing_bias}


def param_layout(fp):
    """model/params.h's build_param_layout for one rank: [(name, shape)] in buffer order, from a
    fingerprint dict. Replicated tensors first (wte, then per layer ln1, qkv, attn_out, ln2 and
    W_mh, W_mg or the MoE's router, then lnf, lm_head), then the expert tensors layer by layer (LatentMoE's
    R_h with them). wte and lm_head have Vp = V rounded up to 128 rows; rows >= V are zero padding."""
    d, L, n_head, V = fp["d"], fp["L"], fp["attn-heads"], fp["V"]
    H, dh, E, fe = fp["latent-heads"], fp["head-dim"], fp["experts"], fp["expert-dim"]
    hp = FFN_KINDS[fp["ffn kind"]] == "latentmoe"
    Vp, attn = (V + 127) // 128 * 128, n_head * (d // n_head)
    layout = [("wte", (Vp, d))]
    for l in range(L):
        pre = "layer%d." % l
        layout += [(pre + "ln1", (d,)), (pre + "qkv", (3 * attn, d)), (pre + "attn_out", (d, attn)),
                   (pre + "ln2", (d,))]
        layout += [(pre + "ffn_in", (H * dh, d)), (pre + "ffn_out", (d, H * dh))] if hp else \
            [(pre + "router", (d, E))]
    layout += [("lnf", (d,)), ("lm_head", (Vp, d))]
    for l in range(L):
        pre = "layer%d." % l
        layout += [(pre + "router", (H, dh, E)), (pre + "expert_in", (H, E, fe, dh)),
                   (pre + "expert_out", (H, E, fe, dh))] if hp else \
            [(pre + "expert_in", (E, fe, d)), (pre + "expert_out", (E, d, fe))]
    return layout


def split_params(ckpt):
    """The checkpoint's flat parameters as {name: float32 array of its shape} (views, no copies), and
    its routing biases as an (L, H, E) array. Refuses what model.py cannot run: a shard of a multi-rank
    run (PATH.rank<r>) and LocMoE's router."""
    fp = ckpt["fingerprint"]
    if fp["ffn kind"] not in FFN_KINDS:
        raise CheckpointError("%s: unknown FFN kind %d in the header" % (ckpt["path"], fp["ffn kind"]))
    layout = param_layout(fp)
    total = sum(int(np.prod(shape)) for _, shape in layout)
    L, H, E, d = fp["L"], fp["latent-heads"], fp["experts"], fp["d"]
    if ckpt["num_params"] != total:
        locmoe_total = total - L * (d * E - E)  # router (d, E) replaced by router_eps (E)
        if FFN_KINDS[fp["ffn kind"]] == "moe" and ckpt["num_params"] == locmoe_total:
            raise CheckpointError("%s: a checkpoint of the LocMoE router (--router locmoe); its capacity flags, "
                                  "which its forward depends on, are not in the checkpoint, so this reader does "
                                  "not load it" % ckpt["path"])
        raise CheckpointError("%s: holds %d parameters, a one-rank model of its shape holds %d: a shard of a "
                              "multi-rank run (PATH.rank<r>)? Only one-rank checkpoints are read" %
                              (ckpt["path"], ckpt["num_params"], total))
    if ckpt["bias_size"] != L * H * E:
        raise CheckpointError("%s: holds %d routing biases, a one-rank model of its shape holds %d (L·H·E)" %
                              (ckpt["path"], ckpt["bias_size"], L * H * E))
    tensors, offset = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape))
        tensors[name] = ckpt["params"][offset:offset + n].reshape(shape)
        offset += n
    return tensors, ckpt["routing_bias"].reshape(L, H, E)


def model_config(ckpt):
    """model.py's Config of the checkpoint (T from the run that wrote it)."""
    from model import Config
    fp = ckpt["fingerprint"]
    return Config(ffn=FFN_KINDS[fp["ffn kind"]], T=ckpt["T"], d=fp["d"], L=fp["L"], n_head=fp["attn-heads"],
                  V=fp["V"], H=fp["latent-heads"], dh=fp["head-dim"], E=fp["experts"], fe=fp["expert-dim"],
                  k=fp["topk"])


def load_model(ckpt):
    """model.py's Model on the checkpoint's weights, and the routing biases (L, H, E) its routing needs.
    float64: model.py computes its rotary angles in float64 and mixes them into q and k, so float64
    is the precision it runs in; the fp32 weights convert exactly."""
    import torch
    from model import Model
    tensors, bias = split_params(ckpt)
    params = {name: torch.from_numpy(np.array(w, dtype=np.float64)) for name, w in tensors.items()}
    return Model(model_config(ckpt), params), torch.from_numpy(np.array(bias, dtype=np.float64))


def read_shard(pattern, vocab):
    """The tokens of the shard the trainer's validation reads: `pattern` itself when it names a file,
    else the first of its sorted glob matches (io/dataloader.h resets to its first shard)."""
    files = [pattern] if os.path.exists(pattern) else sorted(glob.glob(pattern))
    if not files:
        raise CheckpointError("no shard files match '%s'" % pattern)
    path = files[0]
    if not os.path.isfile(path):
        raise CheckpointError("%s: not a regular file, not a shard" % path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 * SHARD_HEADER_INTS:
        raise CheckpointError("%s: shorter than a shard's %d-byte header" % (path, 4 * SHARD_HEADER_INTS))
    magic, version, count, shard_vocab = (int(x) for x in np.frombuffer(data, "<i4", 4))
    if magic != SHARD_MAGIC or version != SHARD_VERSION:
        raise CheckpointError("%s: not an llm.c token shard (magic %d, version %d)" % (path, magic, version))
    if len(data) != 4 * SHARD_HEADER_INTS + 2 * count:
        raise CheckpointError("%s: %d bytes, its header promises %d tokens" % (path, len(data), count))
    if shard_vocab > vocab:
        raise CheckpointError("%s: a shard for vocabulary %d, the model's is %d" % (path, shard_vocab, vocab))
    tokens = np.frombuffer(data, "<u2", count, 4 * SHARD_HEADER_INTS)
    if count and int(tokens.max()) >= vocab:
        raise CheckpointError("%s: token id %d >= vocabulary size %d" % (path, int(tokens.max()), vocab))
    return path, tokens


def validation_loss(model, bias, tokens, B, T, batches):
    """train/loop.h's validation_loss on one rank: micro-batch i is the B·T tokens from i·B·T of the shard
    (targets one further), `batches` of them from its start, at most as many as fit; the mean of their
    mean cross-entropies. Returns (loss, batches used)."""
    import torch
    N = B * T
    batches = min(batches, (len(tokens) - 1) // N)
    if batches < 1:
        raise CheckpointError("the shard holds %d tokens, one batch needs %d" % (len(tokens), N + 1))
    total = 0.0
    with torch.no_grad():
        for i in range(batches):
            window = torch.from_numpy(tokens[i * N:(i + 1) * N + 1].astype(np.int64))
            total += model.loss(window[:-1].reshape(B, T), window[1:].reshape(B, T), bias).item()
    return total / batches, batches


def expected_fingerprint(args, ffn):
    """The fingerprint fields --preset and the model flags fix (None: not given), for the check against
    the header."""
    want = dict.fromkeys(FINGERPRINT)
    if args.preset:
        T, d, L, n_head, hp, ep, B = PRESETS[args.preset]
        H, dh, E, fe, k = hp if ffn == "latentmoe" else (1, d) + ep
        want.update({"d": d, "L": L, "attn-heads": n_head, "V": 256, "latent-heads": H, "head-dim": dh,
                     "experts": E, "expert-dim": fe, "topk": k})
    for field, flag in (("d", "d_model"), ("L", "layers"), ("attn-heads", "attn_heads"), ("V", "vocab"),
                        ("latent-heads", "latent_heads"), ("head-dim", "head_dim"), ("experts", "experts"),
                        ("expert-dim", "expert_dim"), ("topk", "topk")):
        if getattr(args, flag) is not None:
            want[field] = getattr(args, flag)
    if ffn == "moe":  # one routing group as wide as the model, whatever the flags (model/config.h)
        want["latent-heads"], want["head-dim"] = 1, want["d"]
    return want


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("checkpoint", help="a checkpoint file of a one-rank run")
    parser.add_argument("--val-data", help="validation shard (a path or glob; its first shard, as the trainer)")
    parser.add_argument("--batches", type=int, default=8, help="the trainer's --eval-batches [8]")
    parser.add_argument("--state-dict", metavar="OUT.pt", help="write the weights and routing biases with torch.save")
    parser.add_argument("--no-payload-checksum", action="store_true",
                        help="skip the whole-file checksum (version 2's is a byte-by-byte loop in Python, "
                             "slow on large checkpoints); the header's is always checked")
    group = parser.add_argument_group("model flags, checked against the header when given")
    group.add_argument("--preset", choices=sorted(PRESETS))
    for flag in ("seq-len", "batch", "d-model", "layers", "attn-heads", "vocab", "latent-heads", "head-dim",
                 "experts", "expert-dim", "topk"):
        group.add_argument("--" + flag, type=int)
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error("--batches must be at least 1")

    try:
        ckpt = read_checkpoint(args.checkpoint, verify_payload=not args.no_payload_checksum)
        fp = ckpt["fingerprint"]
        ffn = FFN_KINDS.get(fp["ffn kind"], "unknown")
        for field, value in expected_fingerprint(args, ffn).items():
            if value is not None and value != fp[field]:
                raise CheckpointError("%s: checkpoint was written for another model: %s %d there, %d here" %
                                      (args.checkpoint, field, fp[field], value))
        # a preset's T and B are training fields a run may override, so only explicit flags are checked
        for flag, value, stored in (("--seq-len", args.seq_len, ckpt["T"]), ("--batch", args.batch, ckpt["B"])):
            if value is not None and value != stored:
                raise CheckpointError("%s: checkpoint was written with %s %d, not %d" %
                                      (args.checkpoint, flag, stored, value))
        tensors, bias = split_params(ckpt)
        print("%s: version %d, step %d, %s, %d parameters, %d routing biases; B %d T %d grad-accum %d" % (
            args.checkpoint, ckpt["version"], ckpt["step"], ffn, ckpt["num_params"], ckpt["bias_size"], ckpt["B"], ckpt["T"],
            ckpt["grad_accum"]))
        print("model: " + ", ".join("%s %d" % (k, v) for k, v in fp.items() if k != "ffn kind"))
        if not args.val_data and not args.state_dict:
            offset = 0
            for name, w in tensors.items():
                print("  %-20s %-18s offset %d" % (name, tuple(w.shape), offset))
                offset += w.size
            print("  %-20s %-18s" % ("routing_bias", tuple(bias.shape)))
            return 0
        try:
            import torch
        except ImportError:
            print("PyTorch is not installed: the loss and the state dict need it", file=sys.stderr)
            return 1
        if args.state_dict:
            state = {name: torch.from_numpy(np.array(w)) for name, w in tensors.items()}
            state["routing_bias"] = torch.from_numpy(np.array(bias))
            torch.save(state, args.state_dict)
            print("wrote %s: %d tensors (float32) and routing_bias %s" % (args.state_dict, len(tensors),
                                                                        tuple(bias.shape)))
        if args.val_data:
            model, bias64 = load_model(ckpt)
            path, tokens = read_shard(args.val_data, fp["V"])
            loss, used = validation_loss(model, bias64, tokens, ckpt["B"], ckpt["T"], args.batches)
            print("val loss %.9g (model.py, float64; %d batches of B %d x T %d from the start of %s)" % (
                loss, used, ckpt["B"], ckpt["T"], path))
        return 0
    except CheckpointError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # output piped into `head`: end quietly, as a C program does
    sys.exit(main())
