import torch

from fedgen.client.trainer import DPSettings, LocalPlan, local_steps, poisson_sample_rate, train_local
from fedgen.data import load_bundled
from fedgen.model import build_model, preset_config
from fedgen.tokenizers import make_tokenizer

CPU = torch.device("cpu")


def _data(n=96):
    data = load_bundled("train").subset(range(n))
    tokenizer = make_tokenizer("kmer3s1")
    cfg = preset_config("nano", vocab_size=tokenizer.vocab_size, max_len=tokenizer.token_length(70))
    return cfg, tokenizer.encode(data.sequences), torch.tensor(data.labels)


def _distance(model, reference):
    return sum((p - q).pow(2).sum() for p, q in zip(model.parameters(), reference.parameters())).sqrt().item()


def test_step_and_rate_arithmetic():
    assert local_steps(100, 32, 1.0) == 3 and local_steps(10, 32, 0.1) == 1
    assert poisson_sample_rate(120, 16) == 1 / 8


def test_dp_training_extends_the_accountant_history_it_was_given():
    cfg, ids, labels = _data()
    prior = [(1.3, 0.5, 4)]
    dp = DPSettings(noise_multiplier=1.1, max_grad_norm=1.0, accountant="rdp", history=prior, grad_sample_mode="ew")
    plan = LocalPlan(steps=5, batch_size=32, learning_rate=1e-3, seed=0)
    result = train_local(build_model(cfg), ids, labels, plan, CPU, dp)
    assert result.history == [(1.3, 0.5, 4), (1.1, 1 / 3, 5)]
    assert prior == [(1.3, 0.5, 4)]  # the caller's list is not mutated


def test_training_is_deterministic_for_a_seed():
    cfg, ids, labels = _data()
    plan = LocalPlan(steps=3, batch_size=32, learning_rate=1e-3, seed=5)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", history=[], grad_sample_mode="hooks")
    a, b = build_model(cfg), build_model(cfg)
    train_local(a, ids, labels, plan, CPU, dp)
    train_local(b, ids, labels, plan, CPU, dp)
    assert _distance(a, b) == 0.0


def test_proximal_term_keeps_the_model_near_the_global_one():
    cfg, ids, labels = _data()
    start = build_model(cfg)
    free, anchored = build_model(cfg), build_model(cfg)
    train_local(free, ids, labels, LocalPlan(steps=6, batch_size=32, learning_rate=1e-2, seed=0), CPU, None)
    train_local(
        anchored,
        ids,
        labels,
        LocalPlan(steps=6, batch_size=32, learning_rate=1e-2, seed=0, proximal_mu=50.0),
        CPU,
        None,
    )
    assert _distance(anchored, start) < 0.8 * _distance(free, start)


def test_noise_changes_the_update():
    cfg, ids, labels = _data()
    plan = LocalPlan(steps=3, batch_size=32, learning_rate=1e-3, seed=0)
    quiet, noisy = build_model(cfg), build_model(cfg)
    train_local(quiet, ids, labels, plan, CPU, DPSettings(1e-6, 1.0, "rdp", [], "ew"))
    train_local(noisy, ids, labels, plan, CPU, DPSettings(5.0, 1.0, "rdp", [], "ew"))
    assert _distance(quiet, noisy) > 0
