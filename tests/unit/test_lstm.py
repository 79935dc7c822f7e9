import pytest
import torch

from models.errors import ModelError
from models.lstm import ModelConfig, RecurrentRecommender, init_state, resolve_device, step


def _model(**kw) -> RecurrentRecommender:
    torch.manual_seed(0)
    cfg = dict(n_items=50, embedding_dim=8, hidden_dim=12, dropout=0.0)
    cfg.update(kw)
    return RecurrentRecommender(ModelConfig(**cfg)).eval()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"num_layers": 2},
        {"cell": "gru"},
        {"attention_window": 3},
        {"cell": "gru", "num_layers": 2, "attention_window": 4, "tie_weights": False, "input_skip": False},
        {"attention_window": 3, "score_scale": 10.0},
    ],
)
def test_step_equals_full_sequence_forward(kw):
    model = _model(**kw)
    B, T = 5, 7
    items = torch.randint(0, 50, (B, T))
    types = torch.randint(0, 2, (B, T))
    with torch.no_grad():
        queries, _ = model(items, types)
        full_scores = model.score(queries)  # (B, T, V)
    state = init_state(model.config, B)
    for t in range(T):
        out = step(model, state, items[:, t], types[:, t])
        state, scores = out.state, out.scores
        torch.testing.assert_close(scores, full_scores[:, t], rtol=1e-5, atol=1e-5)


def test_shapes_and_state_size():
    model = _model(num_layers=2, attention_window=3)
    cfg = model.config
    assert cfg.state_size == 2 * 2 * 12 + 3 * 12 + 1
    out = step(model, init_state(cfg, 4), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 0, 1]))
    state, scores = out.state, out.scores
    assert state.shape == (4, cfg.state_size)
    assert scores.shape == (4, 50)


def test_zero_row_resets_a_user_in_the_batch():
    model = _model()
    items, types = torch.tensor([3, 3]), torch.tensor([0, 0])
    state = init_state(model.config, 2)
    state = step(model, state, torch.tensor([7, 9]), types).state
    state = state.clone()  # step returns inference tensors; clone to edit in place
    state[1] = 0  # user 1 starts afresh
    scores = step(model, state, items, types).scores
    fresh = step(model, init_state(model.config, 1), items[:1], types[:1]).scores
    torch.testing.assert_close(scores[1], fresh[0])
    assert not torch.allclose(scores[0], fresh[0])


def test_forward_loss_ignores_padding():
    model = _model()
    items = torch.tensor([[1, 2, 3]])
    targets = torch.tensor([[2, 3, -1]])
    _, loss = model(items, torch.zeros_like(items), targets)
    assert loss is not None and torch.isfinite(loss)


def test_bad_config_and_device():
    with pytest.raises(ModelError):
        ModelConfig(n_items=10, cell="transformer")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ModelError):
            resolve_device("cuda")


@pytest.mark.parametrize("B,V", [(1, 20000), (17, 20011), (64, 5000), (3, 100)])
def test_fast_top_k_returns_exactly_torch_topk(B, V):
    from models.topk import top_k

    torch.manual_seed(V)
    scores = torch.randn(B, V)
    scores[0, : V // 3] = float("-inf")  # masked items (purchased) in one row
    expected = torch.topk(scores, 20, dim=1)
    values, indices = top_k(scores, 20)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)


def test_one_step_serves_every_caller_with_the_same_states_and_scores():
    torch.manual_seed(2)
    model = RecurrentRecommender(ModelConfig(n_items=300, embedding_dim=8, hidden_dim=16, dropout=0.0)).eval()
    state, items, types = torch.randn(5, model.config.state_size), torch.tensor([1, 5, 9, 9, 0]), torch.tensor([0, 1, 0, 0, 1])
    full = step(model, state, items, types)  # the evaluator: every item's score
    top = step(model, state, items, types, k=7)  # the worker and the benchmark
    bare = step(model, state, items, types, score=False)  # re-warming after a swap
    assert full.scores.shape == (5, 300) and top.scores is None and bare.scores is bare.top_items is None
    assert torch.equal(full.state, top.state) and torch.equal(full.state, bare.state)
    assert torch.equal(top.top_items, torch.topk(full.scores, 7).indices)
    assert torch.allclose(top.top_scores, torch.topk(full.scores, 7).values)

    masked = step(model, state, items, types, k=7, exclude=[[0, 1]] * 5)
    assert not set(masked.top_items.flatten().tolist()) & {0, 1}
    calls = []

    def scorer(model_, queries, k, exclude):  # an approximate search plugs in here
        calls.append((queries.shape, k))
        return torch.zeros(queries.size(0), k), torch.zeros(queries.size(0), k, dtype=torch.long)

    assert step(model, state, items, types, k=3, scorer=scorer).top_items.shape == (5, 3)
    assert calls == [((5, model.config.embedding_dim), 3)]


def test_with_a_score_scale_scores_are_scaled_cosines_and_follow_new_weights():
    model = _model(score_scale=10.0)
    state = init_state(model.config, 4)
    items, types = torch.tensor([1, 2, 3, 4]), torch.zeros(4, dtype=torch.long)
    scores = step(model, state, items, types).scores  # (4, V); item biases start at 0
    assert scores.abs().max() <= 10.0 + 1e-4
    unit = torch.nn.functional.normalize(model.item_emb.weight.detach(), dim=-1)
    with torch.no_grad():
        queries, _ = model(items.unsqueeze(1), types.unsqueeze(1))  # (4, 1, E)
    torch.testing.assert_close(queries.norm(dim=-1), torch.full((4, 1), 10.0))  # scale x unit queries
    torch.testing.assert_close(scores, queries[:, 0] @ unit.T, rtol=1e-5, atol=1e-5)  # scale x cosine
    with torch.no_grad():
        model.item_emb.weight.mul_(-1.0)  # the cached unit rows must follow the weights
    flipped = step(model, state, items, types).scores
    assert not torch.allclose(flipped, scores)
    with torch.no_grad():
        model.item_emb.weight.mul_(-1.0)
    torch.testing.assert_close(step(model, state, items, types).scores, scores)


@pytest.mark.parametrize("kw", [{}, {"score_scale": 10.0}, {"members": 3}])
def test_inference_scores_carry_the_bias_in_the_product_and_follow_new_weights(kw):
    from models.lstm import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(n_items=300, embedding_dim=8, hidden_dim=12, dropout=0.0, **kw)).eval()
    queries = torch.randn(40, model.config.query_dim)
    params = [p for n, p in model.named_parameters() if n.endswith("item_bias")]

    def reference() -> torch.Tensor:  # the training path's formula: q . e + b
        with torch.no_grad():
            return queries @ model.output_embedding().T + model.item_bias

    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.5)
    for _ in range(2):  # built once, then read from the cache
        with torch.inference_mode():
            got = model.score(queries, out=torch.empty(40, 300))
        torch.testing.assert_close(got, reference(), rtol=1e-5, atol=1e-5)
    assert got.abs().max() > 0.5  # the biases are in it
    with torch.no_grad():
        for p in params:
            p.add_(3.0)  # an in-place update (an optimizer step) must reach the next score
    with torch.inference_mode():
        moved = model.score(queries)
    torch.testing.assert_close(moved, reference(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moved - got, torch.full_like(got, 3.0 * len(params)), rtol=1e-4, atol=1e-4)
