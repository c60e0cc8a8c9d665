import numpy as np
import pytest
import torch

from tests.ddp_scripts.synthetic_cases import write_channel_cases
from vcnn.casefile import CaseFileError
from vcnn.clouds import CloudOptions
from vcnn.datasets import (
    CaseSplit,
    CloudDataset,
    DatasetError,
    TargetScaler,
    derive_seed,
    discover_cases,
    make_split,
    select_by_alpha,
)
from vcnn.features import FeatureSpec, build_batch
from vcnn.network import VectorCloudNet

ALPHAS = [0.5, 1.0, 1.5]
OPTIONS = CloudOptions(diffusivity=0.1, zeta=3.0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    write_channel_cases(folder, ALPHAS, nx=24, ny=10)
    return folder


def test_sources_are_lazy_and_meta_is_read_without_arrays(data_dir):
    sources = discover_cases(data_dir)
    assert [s.alpha for s in sources] == ALPHAS
    assert not any(s.is_loaded for s in sources)
    case = sources[0].load()
    assert sources[0].is_loaded and sources[0].load() is case  # cached


def test_split_by_alpha_defaults_train_to_the_rest_and_never_shares(data_dir):
    sources = discover_cases(data_dir)
    split = make_split(sources, validation_alphas=[1.0], test_alphas=[0.5])
    assert split.names() == {
        "train": ["channel_a1.500"],
        "validation": ["channel_a1.000"],
        "test": ["channel_a0.500"],
    }
    with pytest.raises(DatasetError, match="splits must not share"):
        make_split(sources, validation_alphas=[1.0], test=["channel_a1.000"], data_dir=data_dir)
    with pytest.raises(DatasetError, match="splits must not share"):
        CaseSplit(train=sources[:2], validation=sources[1:2])
    with pytest.raises(DatasetError, match="no case with alpha"):
        select_by_alpha(sources, [3.0])
    with pytest.raises(DatasetError, match="not both"):
        make_split(sources, validation=["channel_a1.000"], validation_alphas=[1.0])


def test_missing_and_corrupt_cases_give_clear_errors(data_dir, tmp_path):
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    from vcnn.datasets import CaseSource

    with pytest.raises(CaseFileError, match="broken.npz"):
        CaseSource(broken).meta
    with pytest.raises(DatasetError, match="not found"):
        make_split(discover_cases(data_dir), test=["nope"], data_dir=data_dir)


def _dataset(data_dir, spec=None, options=None):
    sources = discover_cases(data_dir)
    cases = [s.load() for s in sources]
    return CloudDataset(
        sources,
        spec=spec or FeatureSpec(),
        target_scaler=TargetScaler.fit(cases),
        cloud_options=options or OPTIONS,
    )


def test_batches_carry_the_relative_nodal_volume_and_pooling_is_not_a_cloud_option(data_dir):
    dataset = _dataset(data_dir)
    plan = dataset.draw(12, seed=5)
    batch = dataset.gather(plan.queries[:30], plan.indices[:30]).inputs
    mask = batch.mask
    indices = plan.indices[:30].long()
    volume = dataset.volume
    expected = volume[indices.clamp(min=0)] / volume[plan.queries[:30]][:, None]
    torch.testing.assert_close(batch.volume[mask], expected[mask].float())
    assert torch.all(batch.volume[~mask] == 0) and torch.all(batch.weight[~mask] == 0)
    with pytest.raises(ValueError, match="pooling is a property of the model"):
        CloudOptions.from_dict({"volume_weighted": True})
    assert CloudOptions.from_dict(CloudOptions(cutoff_start=None).to_dict()).cutoff_start is None


def test_clouds_are_redrawn_per_seed_as_int32_indices(data_dir):
    dataset = _dataset(data_dir)
    first = dataset.draw(16, seed=derive_seed(0, 1))
    again = dataset.draw(16, seed=derive_seed(0, 1))
    other = dataset.draw(16, seed=derive_seed(0, 2))
    assert first.indices.dtype == torch.int32
    assert first.indices.shape == (dataset.num_points, 16)
    assert torch.equal(first.indices, again.indices)
    assert not torch.equal(first.indices, other.indices)
    # The query is in its own cloud (column 0) and clouds stay inside their case.
    assert torch.equal(first.indices[:, 0].long(), first.queries)
    case_of = torch.as_tensor(dataset.case_of_point)
    valid = first.indices >= 0
    owner = case_of[first.queries][:, None].expand_as(first.indices)
    assert torch.equal(case_of[first.indices.long().clamp(min=0)][valid], owner[valid])
    subset = dataset.draw(16, seed=1, queries_per_case=10)
    assert subset.queries.numel() == 10 * dataset.num_cases


def test_target_scale_is_the_rms_of_training_tau(data_dir):
    cases = [s.load() for s in discover_cases(data_dir)]
    scaler = TargetScaler.fit(cases)
    tau = np.concatenate([c.tau for c in cases])
    assert scaler.scale == pytest.approx(np.sqrt(np.mean(tau**2)))


@pytest.mark.parametrize(
    "pair", [("proximity", "upstream_cosine"), ("distance", "normalized_radius")]
)
def test_torch_gather_matches_features_build_batch(data_dir, pair):
    spec = FeatureSpec(pair_scalars=pair)
    dataset = _dataset(data_dir, spec)
    plan = dataset.draw(20, seed=3)
    normalizer = dataset.fit_normalizer(plan)
    case_index = 1
    source = dataset.sources[case_index]
    case = source.load()
    sampler = OPTIONS.sampler(case.points, case.velocity, case.period)
    clouds = sampler.sample(20, seed=5)
    offset = int(dataset.offsets[case_index])
    global_indices = torch.as_tensor(np.where(clouds.indices >= 0, clouds.indices + offset, -1))
    ours = dataset.gather(torch.as_tensor(clouds.queries) + offset, global_indices).inputs
    reference = build_batch(case, clouds, spec=spec, options=OPTIONS, normalizer=normalizer)
    # Every input, weights and volumes included, is the same whichever way it is built.
    assert torch.equal(ours.mask, reference.mask)
    for name in ("pos", "vec", "scal", "weight", "volume"):
        torch.testing.assert_close(getattr(ours, name), getattr(reference, name), atol=0, rtol=0)
    for pooling in ("mean", "volume"):
        model = VectorCloudNet(dim=2, num_scalars=spec.num_scalars, num_vectors=1, pooling=pooling)
        torch.testing.assert_close(
            model(**ours.model_inputs()), model(**reference.model_inputs()), atol=0, rtol=0
        )
