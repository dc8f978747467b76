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
