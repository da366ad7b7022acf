"""Cost of relook's attention recording against a plain forward and ``generate(output_attentions)``.

One synthetic multi-image, multi-turn trajectory of about ``--tokens`` positions (system turn,
user turn with 4 noise images of different sizes, a long policy response ending in a tool call,
a tool turn returning one more image, a second response) is built once from a fixed seed, and
four cases run over it on CPU:

    recording       ``analysis.replay.replay_attention`` (SDPA model): one teacher-forced forward
                    that reduces every generated token's attention rows to regions inside the
                    attention function, all layers and heads (what relook does).
    plain           the same forward without recording: same model (its SDPA attention), same
                    inputs, ``use_cache=False`` and ``logits_to_keep=1`` exactly as
                    ``replay_attention`` passes them.
    generate        ``model.generate(output_attentions=True, return_dict_in_generate=True)`` with
                    eager attention, greedy, from the prompt (through the first assistant
                    header, its 4 images) forced to emit the trajectory's remaining
                    ``pos - prompt_len`` tokens (``min_new_tokens = max_new_tokens``): what a
                    researcher does without relook; every step's rows are kept.
    eager_forward   (context only) one teacher-forced eager forward with
                    ``output_attentions=True``: the full ``[layer, head, q_pos, k_pos]`` pattern.

Method. Each case runs in a fresh subprocess (this script re-invoked with the hidden ``--case``
flag; the cases run one after another, never in parallel) that loads the model, builds the
inputs, then:

* ``RSS MiB`` (peak memory of the first, cold call): resident-set high-water mark during the
  call minus the RSS just before it. Before the call the subprocess runs ``gc.collect()`` and
  glibc ``malloc_trim(0)`` (freed heap pages cannot hide new allocations), reads ``VmRSS`` and
  resets the kernel's high-water mark by writing ``5`` to ``/proc/self/clear_refs`` (Linux >=
  4.0; this resets ``ru_maxrss`` too); after the call it reads ``VmHWM``. Torch's CPU
  allocations are plain malloc/mmap, invisible to ``tracemalloc``, but resident, so this counts
  every page the call touched: tensors, Python objects, the kept outputs, one-time lazy buffers,
  and freed heap memory that glibc has not returned to the kernel (its dynamic mmap threshold
  moves large freed buffers onto the heap; the share varies from run to run, see README.md).
  ``warm RSS``: the same over the timed repeats (median). Where ``clear_refs`` is not writable
  it falls back to ``ru_maxrss - rss_before`` (valid only when the call sets the process's
  peak) and says so. ``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment (inherited by the
  subprocesses) makes RSS follow live memory closely, at a time cost.
* ``alloc MiB`` (allocator-level peak, exact for tensors; on unless ``--no-alloc``): one more
  call under ``torch.profiler.profile(profile_memory=True)``. Every allocation event of torch's
  CPU allocator carries the running total of live bytes allocated while profiling; the peak is
  its maximum minus its value before the call. Blind to non-tensor memory. For ``generate`` it
  needs ``--alloc-generate`` (about a minute and 6 GB of profiler events on relook-tiny); without
  it, ``out MiB`` (bytes of the tensors the call returns, here every step's attentions) bounds
  generate's allocator peak from below.
* Time: ``--repeats`` (``--generate-repeats``) warm calls after the measured first call,
  ``time.perf_counter``; median and min are reported (the machine may be shared).

Targets (the issue; printed next to the measured ratios, never asserted): recording at most
1.5x the plain forward's time and 1.3x its peak memory; at least 5x faster and 10x less peak
memory than ``generate(output_attentions=True)``.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/attention.py [--model PATH] [--tokens 2000]``.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import inspect
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from agent.modeling import load_policy
from agent.prompting import system_text
from analysis.replay import replay_attention
from analysis.spans import SpecialIds, region_labels

CASES = ("recording", "plain", "generate", "eager_forward")
# (width, height) of the 4 input images and of the image the tool call returns.
# relook-tiny's processor caps images at 12544 pixels: 16, 12, 6 and 4 tokens, the tool's 16.
INPUT_SIZES = [(448, 448), (480, 320), (56, 84), (56, 56)]
TOOL_SIZE = (224, 224)
TARGETS = {"rec/plain": (1.5, 1.3), "gen/rec": (5.0, 10.0)}


# Trajectory


def _noise(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _plain_ids(tokenizer) -> np.ndarray:
    """Token ids that are neither special nor added tokens (stand-ins for sampled text)."""
    banned = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return np.array([i for i in range(len(tokenizer)) if i not in banned])


def build_trajectory(policy, n_tokens: int, seed: int = 0, max_pixels: int | None = None) -> dict:
    """One trajectory of ``n_tokens`` positions, its region map, replay and generate inputs.

    Layout (the agent's chat format): system turn with tool schemas, user turn
    ``Image k: <image k>`` x 4 + question, assistant header (= prompt end), ~2/3 of the random
    response + a ``reflect`` tool call, a user turn returning image 5, the rest + an answer.

    Returns:
        dict with ``token_ids``, ``response_mask``, ``prompt_len``, ``region_map``, ``inputs``
        (full replay inputs), ``prompt_inputs`` (generate inputs) and ``n_new``.

    Raises:
        ValueError: ``n_tokens`` leaves fewer than 2 response tokens after the fixed parts.
    """
    tok, proc = policy.tokenizer, policy.image_processor
    ids = SpecialIds.from_tokenizer(tok)
    rng = np.random.default_rng(seed)
    images = [_noise(s, rng) for s in [*INPUT_SIZES, TOOL_SIZE]]
    kw = (
        {}
        if max_pixels is None
        else {"size": {"shortest_edge": 56 * 56, "longest_edge": max_pixels}}
    )
    pix = proc(images=images, return_tensors="pt", **kw)
    grid = pix["image_grid_thw"]
    n_pad = [int(t * h * w) // proc.merge_size**2 for t, h, w in grid.tolist()]

    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    def image(k: int) -> list[int]:
        return [ids.vision_start] + [ids.image_pad] * n_pad[k] + [ids.vision_end]

    prompt = enc(system_text(("reflect", "confirm")) + "<|im_start|>user\n")
    for k in range(4):
        prompt += enc(f"Image {k + 1}: ") + image(k)
    prompt += enc("\nWhich image contains the red square?<|im_end|>\n<|im_start|>assistant\n")
    call = enc(
        '</think>\n<tool_call>{"name": "reflect", "arguments": {"images": [2]}}</tool_call><|im_end|>'
    )
    tool = (
        enc("\n<|im_start|>user\n<tool_response>\nHere are the images again: Image 2.\n")
        + enc("Image 2 (reflect): ")
        + image(4)
        + enc("</tool_response><|im_end|>\n<|im_start|>assistant\n")
    )
    answer = enc("</think>\n<answer>2</answer><|im_end|>")
    think = enc("<think>")
    n_free = n_tokens - len(prompt) - len(tool) - len(call) - len(answer) - 2 * len(think)
    if n_free < 2:
        raise ValueError(
            f"--tokens {n_tokens} is too small: the fixed parts take {n_tokens - n_free}"
        )
    plain = _plain_ids(tok)
    free = rng.choice(plain, n_free).tolist()
    n1 = 2 * n_free // 3
    turn1, turn2 = think + free[:n1] + call, think + free[n1:] + answer
    seq = prompt + turn1 + tool + turn2
    mask = [0] * len(prompt) + [1] * len(turn1) + [0] * len(tool) + [1] * len(turn2)
    rmap = region_labels(seq, mask, ids, len(prompt), ["input"] * 4 + ["reflect"])
    input_ids = torch.tensor([seq])
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == ids.image_pad).to(torch.int32),
        "pixel_values": pix["pixel_values"],
        "image_grid_thw": grid,
    }
    rows4 = int(grid[:4].prod(-1).sum())  # pixel_values rows of the 4 prompt images
    p_ids = input_ids[:, : len(prompt)]
    prompt_inputs = {
        "input_ids": p_ids,
        "attention_mask": torch.ones_like(p_ids),
        "mm_token_type_ids": inputs["mm_token_type_ids"][:, : len(prompt)],
        "pixel_values": pix["pixel_values"][:rows4],
        "image_grid_thw": grid[:4],
    }
    return {
        "token_ids": seq,
        "response_mask": mask,
        "prompt_len": len(prompt),
        "region_map": rmap,
        "inputs": inputs,
        "prompt_inputs": prompt_inputs,
        "n_new": len(seq) - len(prompt),
        "image_tokens": n_pad,
    }


# Cases


def _forward_extra(model) -> dict:
    """The extra keyword arguments ``replay_attention`` passes to ``model(...)`` (mirrored; the
    recording case captures the real ones and the driver checks that they agree)."""
    extra = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1
    return extra


def _spy_forward_kwargs(model, seen: dict) -> None:
    """Wrap ``model.forward`` (signature kept) to note every non-input keyword it receives."""
    forward = model.forward

    @functools.wraps(forward)
    def spy(*args, **kwargs):
        seen.update({k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)})
        return forward(*args, **kwargs)

    model.forward = spy


def _tensor_mib(obj) -> float:
    """MiB held by the tensors of a returned object (nested tuples, dicts, dataclasses)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size() / 2**20
    if isinstance(obj, dict):
        return sum(_tensor_mib(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_mib(v) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_tensor_mib(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return 0.0


def make_case(name: str, model_path: str, traj_args: dict, chunk: int):
    """Load what ``name`` needs; return ``(call, info)`` where ``call()`` runs the case once."""
    eager = name in ("generate", "eager_forward")
    policy = load_policy(model_path, attn_implementation="eager" if eager else "sdpa")
    model = policy.model.eval()
    traj = build_trajectory(policy, **traj_args)
    inputs, rmap = traj["inputs"], traj["region_map"]
    spec = getattr(model.config, "text_config", model.config)
    info = {
        "pos": len(traj["token_ids"]),
        "prompt_len": traj["prompt_len"],
        "generated": len(rmap.generated_positions),
        "n_new": traj["n_new"],
        "image_tokens": traj["image_tokens"],
        "regions": len(rmap.region_names),
        "layers": spec.num_hidden_layers,
        "heads": spec.num_attention_heads,
        "kv_heads": spec.num_key_value_heads,
        "hidden": spec.hidden_size,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "forward_kwargs": {},
    }
    if name == "recording":
        _spy_forward_kwargs(model, info["forward_kwargs"])
        return lambda: replay_attention(model, inputs, rmap, chunk=chunk), info
    if name == "plain":
        extra = _forward_extra(model)
        info["forward_kwargs"] = dict(extra)

        def plain():
            with torch.no_grad():
                return model(**inputs, **extra)

        return plain, info
    if name == "eager_forward":
        extra = {**_forward_extra(model), "output_attentions": True}
        info["forward_kwargs"] = dict(extra)

        def eager_forward():
            with torch.no_grad():
                return model(**inputs, **extra)

        return eager_forward, info
    n_new, tok = traj["n_new"], policy.tokenizer

    def generate():
        with torch.no_grad():
            out = model.generate(
                **traj["prompt_inputs"],
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                output_attentions=True,
                return_dict_in_generate=True,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
            )
        if len(out.attentions) != n_new or out.sequences.shape[1] != info["pos"]:
            raise RuntimeError(
                f"generate made {len(out.attentions)} steps, {out.sequences.shape[1]} positions"
            )
        return out

    return generate, info


# Measurement (inside the case subprocess)

_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _settle() -> int:
    """Free what can be freed; return the current RSS in KiB."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    return _status_kib("VmRSS")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_call(call) -> tuple[float, float, float, bool]:
    """Run ``call`` once: ``(seconds, peak RSS increment MiB, output MiB, hwm_was_reset)``."""
    before = _settle()
    exact = _reset_peak()
    t0 = time.perf_counter()
    out = call()
    seconds = time.perf_counter() - t0
    if exact:
        peak = _status_kib("VmHWM")
    else:  # ru_maxrss is the process's peak: valid only if this call set it
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out_mib = _tensor_mib(out)
    del out
    return seconds, (peak - before) / 1024, out_mib, exact


def _alloc_peak(call) -> float:
    """Peak of torch's own CPU allocations during one call (profiler allocation events), MiB.

    Every allocation event carries the allocator's running total of live bytes allocated while
    profiling (``total_allocated``); the peak is its maximum over the call minus its value
    before the first event.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    _settle()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = call()
        del out
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            f = node.extra_fields
            events.append((node.start_time_ns, f.total_allocated, f.alloc_size))
    if not events:
        return float("nan")
    events.sort()
    start = events[0][1] - events[0][2]
    return (max(total for _, total, _ in events) - start) / 2**20


def run_case(args) -> dict:
    """Measure one case in this (fresh) process; returns the JSON-able result."""
    torch.manual_seed(0)
    traj_args = {"n_tokens": args.tokens, "seed": 0, "max_pixels": args.max_pixels}
    call, info = make_case(args.case, args.model, traj_args, args.chunk)
    cold_s, cold_mib, out_mib, exact = _peak_call(call)  # memory: the first call, cold
    times, warm = [], []
    repeats = args.repeats if args.case != "generate" else args.generate_repeats
    for _ in range(repeats):
        s, m, _, _ = _peak_call(call)
        times.append(s)
        warm.append(m)
    alloc = args.alloc and (args.case != "generate" or args.alloc_generate)
    return {
        "case": args.case,
        "seconds": statistics.median(times) if times else cold_s,
        "min_seconds": min(times) if times else cold_s,
        "times": times,
        "cold_seconds": cold_s,
        "peak_mib": cold_mib,
        "warm_mib": statistics.median(warm) if warm else cold_mib,
        "out_mib": out_mib,
        "alloc_mib": _alloc_peak(call) if alloc else None,
        "hwm_reset": exact,
        "threads": torch.get_num_threads(),
        **info,
    }


# Driver


def _spawn(args, case: str) -> dict:
    """Run one case in a fresh interpreter (this script with ``--case``); its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case]
    for flag in ("model", "tokens", "repeats", "generate_repeats", "chunk", "max_pixels"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    cmd += [] if args.alloc else ["--no-alloc"]
    cmd += ["--alloc-generate"] if args.alloc_generate else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else float("nan")


def _fmt(x: float | None, width: int, digits: int = 1) -> str:
    return f"{x:>{width}.{digits}f}" if x is not None else f"{'-':>{width}}"


def report(results: dict[str, dict], args) -> None:
    """Print the setup, the per-case table and the ratios next to the issue's targets."""
    r0 = next(iter(results.values()))
    print(
        f"model {args.model}: {r0['params_m']:.2f} M params, layers {r0['layers']}, "
        f"heads {r0['heads']} (kv {r0['kv_heads']}), hidden {r0['hidden']}"
    )
    print(
        f"trajectory: {r0['pos']} tokens, prompt {r0['prompt_len']}, {r0['generated']} "
        f"generated tokens recorded x {r0['layers']} layers x {r0['heads']} heads x "
        f"{r0['regions']} regions; image tokens {r0['image_tokens']}; generate emits "
        f"{r0['n_new']} new tokens"
    )
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, threads "
        f"{r0['threads']} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), chunk "
        f"{args.chunk}, repeats {args.repeats} (generate {args.generate_repeats}), CPU"
    )
    kw = {k: r["forward_kwargs"] for k, r in results.items() if k in ("recording", "plain")}
    if len(kw) == 2:
        same = "same" if kw["recording"] == kw["plain"] else "DIFFERENT"
        print(f"forward kwargs: recording {kw['recording']}, plain {kw['plain']} ({same})")
    print(
        f"\n{'case':<14}{'median s':>9}{'min s':>8}{'RSS MiB':>9}{'warm RSS':>10}"
        f"{'alloc MiB':>11}{'out MiB':>9}"
    )
    for name, r in results.items():
        print(
            f"{name:<14}{r['seconds']:>9.3f}{r['min_seconds']:>8.3f}{r['peak_mib']:>9.1f}"
            f"{r['warm_mib']:>10.1f}{_fmt(r['alloc_mib'], 11)}{r['out_mib']:>9.1f}"
        )
    if not all(r["hwm_reset"] for r in results.values()):
        print("note: /proc/self/clear_refs not writable: RSS peaks are ru_maxrss - rss_before")
    rec, plain, gen = (results.get(k) for k in ("recording", "plain", "generate"))
    print(f"\n{'ratio':<21}{'time (min)':>14}{'RSS peak':>10}{'alloc peak':>12}   targets")

    def line(name, num, den, bound, targets):
        time_ = f"{_ratio(num['seconds'], den['seconds']):.2f}x"
        time_ += f" ({_ratio(num['min_seconds'], den['min_seconds']):.2f}x)"
        rss = f"{_ratio(num['peak_mib'], den['peak_mib']):.2f}x"
        # Without --alloc-generate, generate's kept attentions bound its allocator peak below.
        if den["alloc_mib"] is None:
            alloc = "-"
        elif num["alloc_mib"] is None:
            alloc = f">={_ratio(num['out_mib'], den['alloc_mib']):.2f}x"
        else:
            alloc = f"{_ratio(num['alloc_mib'], den['alloc_mib']):.2f}x"
        goal = f"{bound} {targets[0]}x time, {bound} {targets[1]}x memory"
        print(f"{name:<21}{time_:>14}{rss:>10}{alloc:>12}   {goal}")

    if rec and plain:
        line("recording / plain", rec, plain, "<=", TARGETS["rec/plain"])
    if rec and gen:
        line("generate / recording", gen, rec, ">=", TARGETS["gen/rec"])
    print(
        "\nRSS: resident high-water mark of the first call over the RSS before it (glibc keeps "
        "freed\nheap pages, so it varies run to run); alloc: peak of live torch allocations "
        "(profiler);\nout: tensors the call returns (for generate: every step's attentions)."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/relook-tiny", help="Qwen2.5-VL directory")
    parser.add_argument("--tokens", type=int, default=2000, help="trajectory length (tokens)")
    parser.add_argument("--repeats", type=int, default=7, help="timed warm calls per case")
    parser.add_argument("--generate-repeats", type=int, default=2, help="timed warm generates")
    parser.add_argument(
        "--chunk", type=int, default=None, help="replay_attention(chunk=...); default: automatic"
    )
    parser.add_argument(
        "--max-pixels", type=int, default=None, help="override the processor's pixel cap"
    )
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument(
        "--no-alloc", dest="alloc", action="store_false", help="skip the profiler peaks"
    )
    parser.add_argument(
        "--alloc-generate",
        action="store_true",
        help="profile generate's allocations too (about a minute and 6 GB on relook-tiny)",
    )
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args)))
        return
    results = {}
    for case in args.cases:  # one after another: never two measurements at once
        results[case] = r = _spawn(args, case)
        print(f"  {case}: {r['seconds']:.3f} s, {r['peak_mib']:.1f} MiB RSS", file=sys.stderr)
    report(results, args)


if __name__ == "__main__":
    main()
