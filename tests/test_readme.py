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


def test_gpu_check_script_parses_and_lists_every_stage_with_its_limit():
    """perf/gpu_check.sh hands over to perf/gpu_check.py, whose docstring (the page a
    session reads before a lease) names every stage with its limit."""
    import importlib.util
    import subprocess
    import sys

    script = ROOT / "perf" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "gpu_check.py" in script.read_text()
    spec = importlib.util.spec_from_file_location("gpu_check_doc", ROOT / "perf" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check_doc"] = gc
    spec.loader.exec_module(gc)
    for stage in gc.STAGES:
        assert re.search(rf"\b{stage.name}\b", gc.__doc__), f"stage {stage.name} not documented"
        if stage.default:  # its line in the table ends with its limit
            limit = re.search(rf"(?ms)^  {stage.name}\s.*?\s(\d+)$", gc.__doc__)
            assert limit and int(limit.group(1)) == stage.limit_s, stage.name
    readme = (ROOT / "README.md").read_text()
    assert "gpu_check.sh" in readme and "unpack" in readme


def test_gpu_check_stages_fit_the_session_and_bench_valid_ops():
    """From the dry run: the stage limits fit ~9 minutes, each command's own budget
    fits its stage, every --ops passed is a bench op, and the wider stage benches
    bn_relu and bn_add_relu against torch on resnet50, both layouts, fp16 and bf16."""
    import subprocess
    import sys

    from tritonbn.perf import model

    dry = subprocess.run([sys.executable, str(ROOT / "perf" / "gpu_check.py"), "OUT", "--dry-run"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert dry.returncode == 0, dry.stderr
    total = 0
    for block in re.split(r"\n(?=[a-z]+ +\d+ s\n)", dry.stdout.split("total of stage")[0]):
        name, limit = re.match(r"([a-z]+) +(\d+) s", block).groups()
        total += int(limit)
        for budget in re.findall(r"--budget-s (\d+)", block):  # a command's own budget
            assert int(budget) + 5 <= int(limit), name  # leaves it time to write its files
        for ops in re.findall(r"--ops ([a-z_,]+)", block):
            assert set(ops.split(",")) <= set(model.OPS), ops
    assert total <= 540, f"stages add up to {total} s"
    wider = dry.stdout.split("\nwider ")[1].split("\ntune ")[0]
    for opt in ("--ops bn_relu,bn_add_relu", "--shapes resnet50 ", "--layouts channels_last,NCHW",
                "--dtypes float16,bfloat16", "--impls tritonbn,torch", "--skip-measured"):
        assert opt in wider, opt


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


def test_readme_links_every_doc_and_each_link_resolves():
    """The README leads with the basics and links the reference in docs/: every link
    to a docs/ file names a file that exists, and every docs/ file is linked."""
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\((docs/[^)#]+)\)", readme))
    present = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}
    assert linked and linked == present, (linked, present)
