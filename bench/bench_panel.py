"""The Slicer panel's own overhead: "Segment" clicked to segments in the scene, minus the run.

    python bench/bench_panel.py [--factor 4] [--repeats 2]

On slicer-core (Slicer's MRML and logic libraries, set up as the application does): slicerio's
CTChest4 is loaded with the volumes logic and upsampled ``--factor`` times (4: 512 x 512 x 136,
the size of Slicer's Sample Data CTChest), then segmented with the demo card through the module's
own runner (``VolSegSlicerLib.runner.EngineRunner``, the warm ``volseg serve`` worker, CPU) as
the panel does. Per run: the wall time from ``segment`` to the imported segmentation node, the
engine's own ``elapsed_s`` (its ``done`` event), and the difference -- exporting the volume for
the engine, polling, reading the result and importing it as segments. The first run warms the
worker (model loaded) and is reported apart; the table is the median of the others. Baseline
column: the same overhead as a share of the whole wait.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "VolSegSlicer"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factor", type=int, default=4, help="upsampling of CTChest4 per axis (default 4)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after the warm-up (default 2)")
    args = parser.parse_args(argv)

    import json
    import subprocess

    from VolSegSlicerLib import testing
    from VolSegSlicerLib.mrml import create_core_context
    from VolSegSlicerLib.runner import EngineRunner
    from VolSegSlicerLib.settings import RunSettings

    models = json.loads(subprocess.run([sys.executable, "-m", "volseg", "models", "--json"], capture_output=True,
                                       text=True, check=True).stdout)["models"]
    demo = testing.demo_model(models)
    context = create_core_context()
    native = context.volumes_logic.AddArchetypeVolume(testing.sample_ct_path(), "CTChest4", 0)
    volume = testing.upsampled_volume(context, native, args.factor, "CTChest") if args.factor > 1 else native
    dims = volume.GetImageData().GetDimensions()
    rows = []
    with tempfile.TemporaryDirectory(prefix="volseg-bench-panel-") as tmp:
        runner = EngineRunner(context, str(REPO / "VolSegSlicer"), temp_root=tmp)
        try:
            for n in range(1 + args.repeats):
                t0 = time.perf_counter()
                job = runner.segment(demo, [volume], RunSettings(device="cpu", keepWarm=True))
                runner.wait_for(job, timeout=1800)
                wall = time.perf_counter() - t0
                if job.monitor.outcome != "done" or job.segmentationNode is None:
                    print(f"run {n}: {job.monitor.outcome}: {job.monitor.error}")
                    return 1
                engine = float(job.monitor.result.get("elapsed_s", float("nan")))
                segments = job.segmentationNode.GetSegmentation().GetNumberOfSegments()
                rows.append((wall, engine, segments))
                print(f"  run {n}{' (warm-up)' if n == 0 else ''}: click to segments {wall:.2f} s, engine "
                      f"{engine:.2f} s, panel overhead {wall - engine:.2f} s, {segments} segments", flush=True)
        finally:
            runner.shutdown()
    timed = rows[1:] or rows
    wall = statistics.median(r[0] for r in timed)
    engine = statistics.median(r[1] for r in timed)
    print(f"\n### The panel's overhead on slicer-core: demo card, {dims[0]}x{dims[1]}x{dims[2]} CT, CPU\n")
    print("| what | median s | share of the wait |")
    print("|---|---:|---:|")
    print(f"| click to segments in the scene | {wall:.2f} | 1.00x |")
    print(f"| the engine's run (`elapsed_s`) | {engine:.2f} | {engine / wall:.2f}x |")
    print(f"| panel overhead (export, poll, read, import) | {wall - engine:.2f} | {(wall - engine) / wall:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
