"""The first GPU rental, rehearsed here: `scripts/gpu_check.sh quick` run with no network at all (a network
namespace of its own) against a replica of the lent GPU machine's software (scripts/gpu-machine.env: Python
3.12, torch 2.11.0, torchvision 0.26.0, ...; no Horovod, no DALI, no Open MPI), from a copy of what one trip
carries there: the repository's tracked files and the Horovod wheel prebuilt for that machine. Every step up to
the first CUDA call must succeed, the GPU steps skip with their reason, and the trip fits 64 MiB.
Set-up: the replica (~3 GB from PyPI, cached) and the wheel (Horovod's CUDA compile, ~5 min on 2 cores, cached
by everything it depends on)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import cli_env

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
TRIP_BYTES = 64 * 1024 * 1024  # what one call to the GPU machine carries
QUICK_SECONDS = 480  # the script's budget: one command of at most 8 minutes, leaving a rerun inside 15
# A network namespace of its own with only loopback up: no network at all, as on the GPU machine, but local
# ranks can reach each other (horovodrun's own check that localhost is this host needs it).
OFFLINE = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "offline"]


def machine() -> dict[str, str]:
    text = (ROOT / "scripts" / "gpu-machine.env").read_text()
    return {name: value.strip('"') for name, value in re.findall(r"^([A-Z_]+)=(.*)$", text, flags=re.M)}


pytestmark = [
    pytest.mark.cli,
    pytest.mark.rehearsal,
    pytest.mark.skipif(
        os.geteuid() != 0
        or not shutil.which("unshare")
        or not shutil.which("ip")
        or not list(Path.home().glob(f".pyenv/versions/{machine()['GPU_MACHINE_PYTHON']}.*/bin/python3"))
        and not shutil.which(f"python{machine()['GPU_MACHINE_PYTHON']}"),
        reason="needs root (unshare --net: no network while it runs) and the GPU machine's Python (pyenv)",
    ),
]


@pytest.fixture(scope="module")
def cache() -> Path:
    return Path(os.environ.get("HVD_IMAGENET_CACHE", Path.home() / ".cache" / "hvd_imagenet"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, cache) -> Path:
    """What `scripts/gpu_check.sh replica` and `wheel` make here, with PyPI: the replica (in the cache) and the
    Horovod wheel for it, in a bundle directory of this test's own."""
    bundle = tmp_path_factory.mktemp("bundle")
    env = {**cli_env(), "GPU_CHECK_BUNDLE": str(bundle), "HVD_IMAGENET_CACHE": str(cache)}
    for step, timeout in (("replica", 1500), ("wheel", 2400)):
        done = subprocess.run(["bash", str(SCRIPT), step], capture_output=True, text=True, env=env, timeout=timeout)
        assert done.returncode == 0, f"gpu_check.sh {step}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        print(done.stdout[-1500:])
    return bundle


@pytest.mark.timeout(4200)
def test_the_prebuilt_wheel_is_for_the_gpu_machine_and_needs_no_mpi(bundle):
    record = dict(line.split("=", 1) for line in (bundle / "horovod-wheel.env").read_text().split())
    expected = machine()
    assert record["TORCH"].split("+")[0] == expected["GPU_MACHINE_TORCH"]
    assert record["PY_TAG"] == "cp" + expected["GPU_MACHINE_PYTHON"].replace(".", "")
    assert record["CUDA_CC"] == expected["GPU_MACHINE_CC"]
    (wheel,) = bundle.glob("horovod-*.whl")
    assert wheel.stat().st_size < TRIP_BYTES // 4, wheel.stat().st_size  # debug info dropped at link time
    unpacked = bundle / "unpacked"
    shutil.unpack_archive(wheel, unpacked, format="zip")
    (library,) = unpacked.glob("horovod/torch/mpi_lib_v2*.so")
    needed = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert "libnccl.so" in needed  # NCCL's allreduce, linked against pip's nvidia-nccl-cu13
    assert "libmpi" not in needed  # the GPU machine has no Open MPI: this library would not load there
    shutil.rmtree(unpacked)


def carried_trip(bundle: Path, trip: Path) -> int:
    """The repository's tracked files and the bundle, as one call carries them; their bytes."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, files):
        (trip / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, trip / name)
    shutil.copytree(bundle, trip / ".gpu-check")
    return sum(path.stat().st_size for path in trip.rglob("*") if path.is_file())


@pytest.mark.timeout(4200)
def test_the_rental_script_runs_offline_on_the_replica(bundle, cache, tmp_path):
    trip, results, home = tmp_path / "trip", tmp_path / "results", tmp_path / "home"
    home.mkdir()
    size = carried_trip(bundle, trip)
    assert size <= TRIP_BYTES, f"one trip carries {size / 2**20:.1f} MiB, over 64"
    replica = cache / "gpu-replica" / "bin"
    env = {
        "PATH": f"{replica}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home),
        "GPU_CHECK_PYTHON": str(replica / "python"),
        "GPU_CHECK_RESULTS": str(results),
        "LANG": "C.UTF-8",
    }
    done = subprocess.run(
        [*OFFLINE, "bash", "scripts/gpu_check.sh", "quick"],
        cwd=trip,
        capture_output=True,
        text=True,
        env=env,
        timeout=QUICK_SECONDS + 120,
    )
    print(done.stdout[-3000:])  # the steps and their times here, in the test's log
    steps = {
        row[0]: row[1:] for row in (line.split("\t") for line in (results / "steps.tsv").read_text().splitlines()[1:])
    }
    assert done.returncode == 0, f"{steps}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    for name in ("probe", "venv", "horovod", "pytest-gpu"):  # up to the first CUDA call, and the tests' skips
        assert steps[name][0] == "ok", (name, steps[name])
    for name in ("bench-torch", "bench-horovod"):
        assert steps[name][0] == "skipped" and "no CUDA device" in steps[name][2], (name, steps[name])
    assert steps["dali"][0] == "skipped" and "not carried" in steps["dali"][2], steps["dali"]
    assert sum(int(status[1]) for status in steps.values()) < QUICK_SECONDS

    probe = (results / "probe.txt").read_text()
    expected = machine()
    assert f"torch: {expected['GPU_MACHINE_TORCH']}" in probe
    assert re.search(rf"python: \S+ {re.escape(expected['GPU_MACHINE_PYTHON'])}\.\d+ headers: True", probe), probe
    assert "import horovod: no" in probe and "import nvidia.dali: no" in probe  # as on the GPU machine
    horovod = (results / "horovod.txt").read_text()
    assert "from the prebuilt wheel" in horovod and "[X] NCCL" in horovod and "[X] Gloo" in horovod
    tests = (results / "pytest-gpu.log").read_text()
    assert re.search(r"\d+ skipped", tests) and not re.search(r"\d+ (failed|error)", tests), tests[-3000:]
    assert "no CUDA GPU here" in tests  # the reason each GPU test gives

    # What the skipped GPU steps run, on the CPU at toy size, in the venv the script made (torch 2.11 and the
    # prebuilt wheel, offline): the step unit alone, then through Horovod under horovodrun.
    for backend in ("none", "horovod"):
        done = subprocess.run(
            [
                *OFFLINE,
                str(trip / ".gpu-venv" / "bin" / "hvd-imagenet"),
                "bench-train",
                "--backend",
                backend,
                "--np",
                "1",
                "--arch",
                "cifar_resnet8",
                "--image-size",
                "16",
                "--batch-size",
                "8",
                "--precision",
                "amp-bf16",
                "--layout",
                "nhwc",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--repeats",
                "1",
                "--json",
            ],
            cwd=trip,
            capture_output=True,
            text=True,
            env={**env, "PATH": f"{trip / '.gpu-venv' / 'bin'}:{env['PATH']}"},
            timeout=300,
        )
        assert done.returncode == 0, f"{backend}: {done.stderr[-3000:]}"
        assert f'"backend": "{backend}"' in done.stdout and '"images_per_sec_per_worker"' in done.stdout
