"""What converting a real-size model costs, predicted from one measured run (docs/convert_cost.md).

    python docs/convert_cost.py REPORT     # REPORT: a convert_report.json of a measured conversion

Memory, for every size: convert.conversion_memory, from the config (what convert.py prints before
it starts: one layer, its float64 fits, the calibration activations, the writer's embedding).

Time: a layer's work is multiply-adds, counted here per layer from the config and the calibration
size (below). On the CPU that measured the report, a layer's seconds scale with them: the
measured seconds per layer times the ratio of the counts, float64 counted twice (a CPU does
float64 at about half its float32 rate). On a GPU there is no measurement here: the counts at a
stated fraction of the vendor's peak rates, float32 and float64 apart, since consumer GPUs do
float64 at 1/64 of their float32 rate, plus reading the checkpoint and writing the result (bf16)
at an assumed disk rate.

Counted per layer, n = samples x tokens, P = the layer's parameters, A = its attention's, for the
recipe the measurement in docs/convert_cost.md used (steps 1-5, the latent on the partial-RoPE
stream; today's default has no second stream and adds step 6, whose Adam steps are not counted):
  float32  the original block over the hidden states (2 n P), the partial-RoPE block (2 n P), and
           refit_output's two attention passes (2 x 2 n A); each attention core 2 n T H d_h.
  float64  second_moments twice (2 x 2 n (D+1)^2), refit_output's normal equations
           (2 n ((H d_v)^2 + D H d_v)) and solve ((H d_v)^3), the fits' products with the second
           moments (about 8 L D^2 + 2 H d_h D^2) and eigendecompositions (9 m^3 each).
"""
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import args_from_config, checkpoint_tensors  # noqa: E402
from convert import conversion_memory  # noqa: E402

# published config.json fields that size the work (Meta's Llama-3.x releases)
LLAMA = dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072)
SIZES = {
    "Llama-3.2-1B": dict(LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "Llama-3.1-70B": dict(LLAMA, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=128),
}
# (name, float32 TFLOP/s, float64 TFLOP/s), vendor peaks (dense, no tensor-core float32 shortcuts)
GPUS = [("H100 SXM", 67.0, 67.0), ("RTX 4090", 82.6, 1.3)]
GPU_EFFICIENCY = 0.4  # the fraction of peak assumed reached: an assumption, not a measurement
DISK_GBS = 1.0  # reading the checkpoint and writing the result, GB/s: an assumption (a local NVMe does more)


def layer_flops(args, n_samples: int, length: int) -> tuple[float, float]:
    """(float32, float64) floating-point operations of one layer's conversion (module docstring)."""
    n, T, D, H, d_h = n_samples * length, length, args.dim, args.n_heads, args.head_dim
    L = args.n_kv_heads * d_h
    tensors = {k: math.prod(s) for k, (_, s) in checkpoint_tensors(args).items() if k.startswith("layers.0.")}
    P, A = sum(tensors.values()), sum(v for k, v in tensors.items() if ".attention." in k)
    core = 2 * n * T * H * d_h
    fp32 = 2 * (2 * n * P + core) + 2 * (2 * n * A + core)
    hv = H * d_h
    fp64 = (2 * 2 * n * (D + 1) ** 2 + 2 * n * (hv ** 2 + D * hv) + hv ** 3 + 8 * L * D ** 2 + 2 * H * d_h * D ** 2
            + 9 * (2 * L) ** 3 * 2)
    return fp32, fp64


def main():
    report = json.loads(Path(sys.argv[1]).read_text())
    source = json.loads((Path(report["source"]) / "config.json").read_text())
    measured = args_from_config(source)
    words = report["settings"]["calibration"].split()  # "128 samples x 256 tokens"
    n_samples, length = int(words[0]), int(words[3])
    f32, f64 = layer_flops(measured, n_samples, length)
    per_layer = report["convert_seconds"] / measured.n_layers  # the writer and the set-up shared out
    cpu_rate = (f32 + 2 * f64) / per_layer  # this CPU's effective rate, float64 counted twice
    print(f"measured: {report['source']}, {measured.n_layers} layers, {n_samples} x {length} calibration tokens, "
          f"{report['convert_seconds']} s ({per_layer:.1f} s per layer), peak {report['convert_peak_rss_mb']} MB; "
          f"an effective {cpu_rate / 1e9:.0f} GFLOP/s")
    head = "| model | peak memory | this CPU | " + " | ".join(f"one {g[0]} (predicted)" for g in GPUS) + " |"
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    for name, config in SIZES.items():
        a = args_from_config(config)
        f32, f64 = layer_flops(a, n_samples, length)
        mem = conversion_memory(a, n_samples, length, "cpu")["device"] / 2**30
        gpu_mem = conversion_memory(a, n_samples, length, "cuda")["device"] / 2**30
        cpu_h = a.n_layers * (f32 + 2 * f64) / cpu_rate / 3600
        io = 2 * 2 * sum(math.prod(s) for _, (_, s) in checkpoint_tensors(a).items()) / (DISK_GBS * 1e9)  # bf16 in, out
        gpus = [(a.n_layers * (f32 / (r32 * 1e12) + f64 / (r64 * 1e12)) / GPU_EFFICIENCY + io) / 60
                for _, r32, r64 in GPUS]
        print(f"| {name} | {mem:.1f} GiB (GPU: {gpu_mem:.1f} GiB) | {cpu_h:.1f} h | "
              + " | ".join(f"{m:.1f} min" for m in gpus) + " |")


if __name__ == "__main__":
    main()
