"""The README's TarFlow snippet (section "GS-Jacobi for autoregressive flows"), run as written."""

README_FLOWS_SNIPPET = '''
import torch
from fastdiff.flows import load_digits_tarflow, metric_images, sample
from fastdiff.metrics import evaluate_samples

model, settings = load_digits_tarflow()             # the shipped digits TarFlow, offline
labels = torch.arange(100) % 10
images, stats = sample(model, labels, generator=torch.Generator().manual_seed(0),
                       **settings.invert_kwargs())  # GS-Jacobi with the automatic strategy
print(f"{stats.passes} transformer passes ({stats.pass_speedup:.1f}x fewer than sequential)")
print(evaluate_samples(metric_images(images), labels, metric="digits"))
'''


def test_readme_flows_snippet_runs(capsys):
    namespace: dict = {}
    exec(compile(README_FLOWS_SNIPPET, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "fewer than sequential" in out and "FD-digits" in out
    assert namespace["stats"].pass_speedup > 1
    assert namespace["images"].shape == (100, 1, 8, 8)
