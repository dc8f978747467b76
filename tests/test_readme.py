"""The README's test command is what CI runs."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"Tests \(.*?\n```bash\n(.+?)\n```", readme, re.S)
    assert block, "README lost its test command"
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert block.group(1).strip() in [line.strip() for line in ci_lines]


def test_ci_runs_the_readme_main_job_and_the_bench_smoke():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"Main job \(.*?\n```bash\n(.+?)\n```", readme, re.S)
    assert block, "README lost its main-job command"
    main_job = block.group(1).strip()
    assert "tritonbn demo" in main_job and "tritonbn report perf/results" in main_job
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert main_job in ci_lines
    assert any(line.startswith("python -m tritonbn bench --device cpu --shapes quick")
               for line in ci_lines)


def test_gpu_check_script_parses_and_runs_every_stage_it_lists():
    import subprocess

    script = ROOT / "perf" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    default = re.search(r'stages=" \$\{\*:-([a-z ]+)\} "', text)
    assert default, "gpu_check.sh lost its default stage list"
    for name in default.group(1).split():
        assert f"if want {name}; then" in text
        assert re.search(rf"^#\s+{name}\s", text, re.M), f"stage {name} not in the header"
    assert "TRITONBN_CACHE_DIR=" in text and "--export" in text


def test_gpu_check_stages_fit_the_session_and_bench_valid_ops():
    """Each stage's `timeout` matches its header limit, all of them fit ~9 minutes, every
    --ops the script passes is a bench op, and the residual stage benches bn_add_relu
    against torch on resnet50, channels_last, fp16 and bf16."""
    from tritonbn.perf import model

    text = (ROOT / "perf" / "gpu_check.sh").read_text()
    stages = re.search(r'stages=" \$\{\*:-([a-z ]+)\} "', text).group(1).split()
    total = 0
    for name in stages:
        limit = re.search(rf"^#\s+{name}\s.*?<=\s*(\d+) s$", text, re.M | re.S)
        body = text.split(f"if want {name}; then", 1)[1].split("\nfi\n", 1)[0]
        timeout = re.search(r"timeout (\d+) ", body)
        assert limit and timeout, name
        assert int(limit.group(1)) == int(timeout.group(1)), name
        budget = re.search(r"--budget-s (\d+)", body)
        assert budget is None or int(budget.group(1)) + 10 <= int(timeout.group(1)), name
        total += int(timeout.group(1))
    assert total <= 540, f"stages add up to {total} s"
    for ops in re.findall(r"--ops ([a-z_,]+)", text):
        assert set(ops.split(",")) <= set(model.OPS), ops
    body = text.split("if want residual; then", 1)[1].split("\nfi\n", 1)[0]
    for opt in ("--ops bn_add_relu", "--shapes resnet50 ", "--layouts channels_last",
                "--dtypes float16,bfloat16", "--impls tritonbn,torch"):
        assert opt in body, opt


def test_demo_runs_from_a_shell_without_triton_interpret():
    """The main job on a fresh machine: no TRITON_INTERPRET in the environment, so
    the command itself must choose the interpreter before triton is imported."""
    import os
    import subprocess
    import sys

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU the demo runs compiled kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tritonbn", "demo", "--steps", "1"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "OK: worst difference" in proc.stdout and "fused with their ReLU" in proc.stdout
