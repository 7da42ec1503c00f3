"""analyze.py: subspace similarity (eq. 4), Table 7's projection norms, Figure 8's data, and the CLI."""

import math

import numpy as np
import pytest
import torch
from conftest import write_hf_gpt2

import lora_analysis
from checkpoints.adapters import save_adapter
from lora import LoRAConfig, apply_lora
from lora_analysis import expected_random_grid, projection_norms, similarity_grid, w_delta_similarity
from model import GPT
from plumbing.files import load_safetensors
from tools import analyze
from tools.analyze import delta_w


@pytest.fixture(autouse=True)
def one_thread():
    """The matrices here are tiny: extra threads only spin, and slow everything down many-fold when the
    suite shares its 2 cores with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def orthonormal(rows, cols, seed):
    """A rows x cols matrix with orthonormal columns, drawn at random."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


# ----------------------------------------------------------------------------------------------------------
# Eq. 4


def test_phi_of_a_matrix_with_itself_is_one_and_phi_lies_in_unit_interval():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 40, generator=g)
    for i in range(1, 7):
        assert lora_analysis.subspace_similarity(A, A, i, i) == pytest.approx(1.0, abs=1e-6)
    # against itself every top-i subspace contains every smaller one: the whole grid is 1
    np.testing.assert_allclose(similarity_grid(A, A), 1.0, atol=1e-6)
    # mixing A's rows keeps its row space: the full subspaces agree (phi = 1) though the top directions move
    R = torch.randn(6, 6, generator=g)
    assert lora_analysis.subspace_similarity(A, R @ A, 6, 6) == pytest.approx(1.0, abs=1e-6)
    other = torch.randn(4, 40, generator=g)
    grid = similarity_grid(A, other)
    assert grid.shape == (6, 4)
    assert grid.min() >= 0.0 and grid.max() <= 1.0
    assert grid.max() < 0.9  # two random 6- and 4-dim subspaces of R^40 are far from nested
    for i, j in [(1, 1), (3, 2), (6, 4)]:  # the grid is eq. 4 entry by entry
        assert grid[i - 1, j - 1] == pytest.approx(lora_analysis.subspace_similarity(A, other, i, j), abs=1e-12)


def test_expected_random_grid_is_max_i_j_over_d():
    grid = expected_random_grid(8, 64, 512)
    assert grid.shape == (8, 64)
    assert grid[0, 0] == 1 / 512 and grid[7, 3] == 8 / 512 and grid[2, 63] == 64 / 512


def test_independent_gaussian_matrices_have_phi_equal_to_max_i_j_over_d_on_average():
    # E[phi(i, j)] = max(i, j) / d for independent random subspaces (derived in expected_random_grid).
    # Spread of one draw: for i <= j, phi(i, j) averages i squared projections, each Beta(j/2, (d-j)/2), of
    # sd sqrt(2 j (d-j) / (d^2 (d+2))); for (8, 64) that is 0.0206 / sqrt(8) = 0.0073. The mean of the whole
    # 8 x 64 grid has sd 0.006 (its entries move together). Over 25 draws both shrink 5-fold, so the
    # tolerances below are about 4 standard deviations: any seed passes, a wrong expectation does not.
    r1, r2, d, draws = 8, 64, 512, 25
    g = torch.Generator().manual_seed(1)
    mean = np.mean([similarity_grid(torch.randn(r1, d, generator=g), torch.randn(r2, d, generator=g))
                    for _ in range(draws)], axis=0)
    expected = expected_random_grid(r1, r2, d)
    assert expected.mean() == pytest.approx(0.063797, abs=1e-6)  # sum of max(i, j) / (8 * 64 * 512)
    assert mean.mean() == pytest.approx(expected.mean(), abs=0.005)
    assert mean[7, 63] == pytest.approx(64 / 512, abs=0.006)
    assert mean[7, 7] == pytest.approx(8 / 512, abs=0.006)
    # random_baseline draws such a pair with the shapes of the given matrices: one draw, 4 sd = 0.024
    A1, A2 = torch.zeros(r1, d), torch.zeros(r2, d)
    baseline = lora_analysis.random_baseline(A1, A2, seed=3)
    assert baseline.shape == (r1, r2)
    assert baseline.mean() == pytest.approx(expected.mean(), abs=0.024)
    np.testing.assert_array_equal(baseline, lora_analysis.random_baseline(A1, A2, seed=3))


def test_planted_shared_subspace_is_found_and_nothing_beyond_it():
    # A1 (8 x d) and A2 (16 x d) share their k = 3 strongest right-singular directions S; their other
    # directions are independent random ones (orthogonal to S). So phi(i, j) = 1 for i, j <= k, and beyond
    # k the noise directions overlap only as much as random ones: E||N1^T N2||_F^2 = (r1-k)(r2-k) / (d-k).
    d, k, r1, r2 = 256, 3, 8, 16
    S = orthonormal(d, k, seed=0)

    def adapter_like(rank, seed):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(d, rank - k, generator=g, dtype=torch.float64)
        N = torch.linalg.qr(noise - S @ (S.T @ noise)).Q  # random directions orthogonal to S
        strengths = torch.cat([torch.tensor([10.0, 9.0, 8.0]), torch.linspace(1.0, 0.5, rank - k)])
        mix = orthonormal(rank, rank, seed + 100)  # a rotation on the left changes no right-singular vector
        return mix @ torch.diag(strengths.double()) @ torch.cat([S, N], dim=1).T

    A1, A2 = adapter_like(r1, seed=1), adapter_like(r2, seed=2)
    grid = similarity_grid(A1, A2)
    np.testing.assert_allclose(grid[:k, :k], 1.0, atol=1e-9)
    assert grid[k, k] < 0.8  # the 4th directions are unrelated: (3 + ~1/253) / 4
    noise_overlap = grid[r1 - 1, r2 - 1] * r1 - k  # ||N1^T N2||_F^2
    expected = (r1 - k) * (r2 - k) / (d - k)  # 0.257; sd about 0.044 (five Beta(13/2, 240/2) terms)
    assert noise_overlap == pytest.approx(expected, abs=0.18)
    assert noise_overlap / (r1 - k) < 0.1  # each noise direction of A1 lies < 10% inside A2's subspace


# ----------------------------------------------------------------------------------------------------------
# Table 7 and Figure 8 on a Delta W and W built from known singular vectors.


def constructed_pair():
    """Delta W = U3 diag(5, 3, 2) V3^T, and W = U3 C V3^T + U' diag(9, 7, 6, 4) V'^T with small C (3 x 3):
    W's four strong directions are orthogonal to Delta W's, and along Delta W's it has only C."""
    out_features, in_features = 48, 32
    U, V = orthonormal(out_features, 7, seed=10), orthonormal(in_features, 7, seed=11)
    C = torch.tensor([[0.3, 0.1, 0.0], [0.0, 0.2, 0.05], [0.1, 0.0, 0.1]], dtype=torch.float64)
    delta = U[:, :3] @ torch.diag(torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64)) @ V[:, :3].T
    strong = torch.diag(torch.tensor([9.0, 7.0, 6.0, 4.0], dtype=torch.float64))
    W = U[:, :3] @ C @ V[:, :3].T + U[:, 3:] @ strong @ V[:, 3:].T
    return delta.float(), W.float(), C


def test_projection_norms_match_hand_computed_values():
    delta, W, C = constructed_pair()
    norms = projection_norms(delta, W, r=3)
    c = math.sqrt(0.3**2 + 0.1**2 + 0.2**2 + 0.05**2 + 0.1**2 + 0.1**2)  # ||C||_F = 0.4153
    assert norms["delta"] == pytest.approx(c, abs=1e-5)  # U^T W V^T = C up to signs
    assert norms["w"] == pytest.approx(math.sqrt(81 + 49 + 36), abs=1e-5)  # W's top-3 singular values
    assert norms["w_norm"] == pytest.approx(math.sqrt(c**2 + 81 + 49 + 36 + 16), abs=1e-5)
    assert norms["delta_norm"] == pytest.approx(math.sqrt(25 + 9 + 4), abs=1e-5)
    assert norms["amplification"] == pytest.approx(math.sqrt(38) / c, abs=1e-4)  # 14.84
    # no r-dim U, V capture more of W than its own top-r singular vectors (Eckart-Young)
    assert 0 < norms["random"] < norms["w"]
    assert norms["random"] == projection_norms(delta, W, r=3, seed=0)["random"]
    assert norms["random"] != projection_norms(delta, W, r=3, seed=1)["random"]


def test_figure8_grid_sees_delta_w_outside_w_top_directions():
    delta, W, _ = constructed_pair()
    for side in ("left", "right"):
        grid = w_delta_similarity(W, delta, r=3, side=side)
        assert grid.shape == (32, 3)  # i up to min(out, in), j up to r
        # W's top 4 directions are orthogonal to all of Delta W's; its next 3 span exactly Delta W's 3
        np.testing.assert_allclose(grid[3, :], 0.0, atol=1e-6)
        assert grid[6, 2] == pytest.approx(1.0, abs=1e-6)
    assert lora_analysis.random_w_similarity(W, r=3).shape == (32, 3)


def test_delta_w_is_scale_times_b_a_and_base_weight_takes_the_right_rows():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g).bfloat16()
    tensors = {"transformer.h.1.attn.c_attn.lora.v.lora_A": A, "transformer.h.1.attn.c_attn.lora.v.lora_B": B}
    result = delta_w(tensors, 1, "v", 4.0)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, 4.0 * B.float() @ A, rtol=0, atol=1e-6)
    assert analyze.adapted_projections(tensors) == [(1, "v")]
    assert analyze.tensor_prefix(3, "mlp_proj") == "transformer.h.3.mlp.c_proj.lora.mlp"
    assert LoRAConfig(alpha=16, rank=4).scale == 4  # alpha / r
    assert LoRAConfig(alpha=16, rank=4, rslora=True).scale == 8  # alpha / sqrt(r)


# ----------------------------------------------------------------------------------------------------------
# The command line on two small adapters (rank 2 and rank 4 on q and v) of a tiny GPT-2.


def make_adapter(base, path, rank, seed):
    torch.manual_seed(seed)
    model = apply_lora(GPT.from_pretrained(base), LoRAConfig(rank=rank, alpha=8, targets=("q", "v")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)  # as if trained: Delta W is not zero
    save_adapter(model, path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("analyze")
    base, other = folder / "base", folder / "other"
    write_hf_gpt2(base, n_embd=64, vocab_size=256)
    write_hf_gpt2(other, n_embd=32, vocab_size=256)
    return dict(base=base, other=other, r2=make_adapter(base, folder / "r2.safetensors", 2, seed=1),
                r4=make_adapter(base, folder / "r4.safetensors", 4, seed=2),
                small=make_adapter(other, folder / "small.safetensors", 2, seed=3))


def table_rows(text):
    """{(layer, projection): [numbers]} from the printed table's rows."""
    rows = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) > 2 and words[0].isdigit():
            rows[int(words[0]), words[1]] = [float(w) for w in words[2:]]
    return rows


def test_similarity_cli_prints_phi_per_layer_and_projection(adapters, tmp_path, capsys):
    analyze.main(["similarity", str(adapters["r2"]), str(adapters["r4"]), "--out", str(tmp_path)])
    rows = table_rows(capsys.readouterr().out)
    assert list(rows) == [(0, "q"), (0, "v"), (1, "q"), (1, "v")]
    t2, _ = load_safetensors(adapters["r2"])
    t4, _ = load_safetensors(adapters["r4"])
    for (layer, projection), (r1, r2, phi11, mean, random) in rows.items():
        grid = similarity_grid(analyze.lora_A(t2, layer, projection), analyze.lora_A(t4, layer, projection))
        assert (r1, r2) == (2, 4)
        assert phi11 == pytest.approx(grid[0, 0], abs=6e-5)
        assert mean == pytest.approx(grid[:2, :2].mean(), abs=6e-5)
        assert random == pytest.approx((1 + 2 + 2 + 2) / 4 / 64, abs=6e-5)  # mean of max(i, j) / d, i, j <= 2

    # a second run into a folder of its own: with matplotlib installed the first one wrote heatmaps there
    analyze.main(["similarity", str(adapters["r2"]), str(adapters["r4"]), "--layer", "1", "--target", "v",
                  "--out", str(tmp_path / "v")])
    assert list(table_rows(capsys.readouterr().out)) == [(1, "v")]
    assert (tmp_path / "similarity_layer0_q.png").is_file() == analyze.have_matplotlib()
    assert sorted(p.name for p in (tmp_path / "v").glob("*.png")) == (["similarity_layer1_v.png"]
                                                                      if analyze.have_matplotlib() else [])


def test_deltaw_cli_prints_table7_per_layer_and_projection(adapters, tmp_path, capsys):
    analyze.main(["deltaw", str(adapters["r4"]), "--out", str(tmp_path)])  # base model from the metadata
    rows = table_rows(capsys.readouterr().out)
    assert list(rows) == [(0, "q"), (0, "v"), (1, "q"), (1, "v")]
    tensors, _ = load_safetensors(adapters["r4"])
    model = GPT.from_pretrained(adapters["base"])
    C = model.config.n_embd
    v_rows = model.transformer.h[1].attn.c_attn.weight[2 * C:].detach()  # [q | k | v]: v is the last third
    assert torch.equal(analyze.base_weight(model, 1, "v"), v_rows)
    for (layer, projection), numbers in rows.items():
        delta = delta_w(tensors, layer, projection, 8 / 4)  # alpha / r
        W = analyze.base_weight(model, layer, projection)
        norms = projection_norms(delta, W, 4, seed=layer)
        expected = [norms[key] for key in ("delta_norm", "w_norm", "delta", "w", "random")]
        np.testing.assert_allclose(numbers[:5], expected, atol=6e-5)
        assert numbers[5] == pytest.approx(norms["amplification"], abs=6e-3)
        top_tenth = w_delta_similarity(W, delta, 4)[5, 3]  # W's top 10% (6 of 64) vs all 4 of Delta W's
        assert numbers[6] == pytest.approx(top_tenth, abs=6e-5)
        assert numbers[7] == pytest.approx(6 / 64, abs=6e-5)


def one_line_error(argv):
    with pytest.raises(SystemExit) as caught:
        analyze.main(argv)
    message = str(caught.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_user_mistakes_are_one_line_errors(adapters, tmp_path):
    assert "cannot read" in one_line_error(["similarity", str(tmp_path / "missing.safetensors"),
                                            str(adapters["r4"])])
    assert "not a lora-gpt adapter" in one_line_error(["deltaw", str(adapters["base"] / "model.safetensors")])
    assert "different shapes" in one_line_error(["similarity", str(adapters["r2"]), str(adapters["small"])])
    other_model = str(adapters["other"])
    assert "does not fit" in one_line_error(["deltaw", str(adapters["r4"]), "--model", other_model])
    assert "layers 0..1" in one_line_error(["deltaw", str(adapters["r4"]), "--layer", "2"])
    assert "no updates on o" in one_line_error(["similarity", str(adapters["r2"]), str(adapters["r4"]),
                                                "--target", "o"])


def test_heatmaps_are_written_as_png(adapters, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    analyze.main(["similarity", str(adapters["r2"]), str(adapters["r4"]), "--layer", "0", "--target", "q",
                  "--out", str(tmp_path)])
    analyze.main(["deltaw", str(adapters["r4"]), "--layer", "1", "--out", str(tmp_path)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["deltaw_layer1_q.png", "deltaw_layer1_v.png", "similarity_layer0_q.png"]  # no temp files
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in names)
    assert analyze.PLOT_HINT not in capsys.readouterr().out


def test_without_matplotlib_tables_come_with_a_hint(adapters, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(analyze, "have_matplotlib", lambda: False)
    analyze.main(["similarity", str(adapters["r2"]), str(adapters["r4"]), "--out", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert analyze.PLOT_HINT in out and "pip install matplotlib" in out
    assert not (tmp_path / "plots").exists()
