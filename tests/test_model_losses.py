"""Model structure (docs/METHOD.md §2) and losses (§4) against straightforward references."""
import math

import pytest
import torch
import torch.nn.functional as F

from alr_fast.losses import batch_hard_triplet, identity_loss, pairwise_euclidean
from alr_fast.model import PretrainedWeightsError, ReidNet
from alr_fast.task import ReidTask
from alr_fast.regularizer import AdaptiveL2

FACTORS = dict(kernel=0.005, bias=0.005, gamma=0.005, beta=0.005)


def test_shapes_last_stride_and_init():
    torch.manual_seed(0)
    net = ReidNet(11, "resnet50").eval()
    x = torch.randn(2, 3, 64, 32)
    feats, logits = net(x)
    assert [f.shape[1] for f in feats] == [2048, 1024, 1024]
    assert all(z.shape == (2, 11) for z in logits)
    assert net.embed(x).shape == (2, 4096)
    # last stride 1: layer4 keeps layer3's 4x2 map for a 64x32 input
    assert net.layer4[0].conv2.stride == (1, 1) and net.layer4[0].downsample[0].stride == (1, 1)
    assert net.layer4_regional is not net.layer4
    assert all(n.eps == 2e-5 for n in net.necks)
    assert all(fc.bias is None and abs(fc.weight.std().item() - 0.001) < 2e-4 for fc in net.classifiers)
    assert all(m.momentum == 0.01 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # copies start identical (same init) but are independent tensors
    for a, b in zip(net.layer4.parameters(), net.layer4_regional.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_features_are_clipped_and_flip_averaged():
    torch.manual_seed(1)
    net = ReidNet(5, "resnet18").eval()
    x = torch.randn(3, 3, 64, 32) * 5
    feats, _ = net(x)
    for f in feats:
        assert f.min() >= 0 and f.max() <= 1
    both = (torch.cat(net.branch_features(x), 1) + torch.cat(net.branch_features(x.flip(3)), 1)) / 2
    torch.testing.assert_close(net.embed(x, flip=True), both)
    torch.testing.assert_close(net.embed(x, flip=False), torch.cat(net.branch_features(x), 1))


def test_stripes_cover_the_map_with_remainder_in_last():
    torch.manual_seed(2)
    net = ReidNet(5, "resnet18", region_num=3).eval()
    x = torch.randn(2, 3, 112, 32)  # layer4 map 7x2: stripes of rows 0-1, 2-3 and 4-6
    feats, _ = net(x)
    assert len(feats) == 4 and feats[1].shape[1] == 512 // 3  # the seed's stripe width: channels // region_num
    with torch.no_grad():
        r = net.layer4_regional(net.layer3(net.layer2(net.layer1(net.stem(x)))))
        assert r.shape[2] == 7
        for conv, rows, f in zip(net.stripe_convs, [(0, 2), (2, 4), (4, 7)], feats[1:]):
            s = F.relu(conv(r[:, :, rows[0] : rows[1]]))  # zero padding within the stripe
            torch.testing.assert_close(f, s.mean((2, 3)).clamp(0, 1))


def test_freezing_sets_bn_eval_and_no_grad():
    net = ReidNet(5, "resnet18")
    reg = AdaptiveL2(net, FACTORS)
    task = ReidTask(net, reg)
    task.set_backbone_frozen(True)
    task.train()
    assert not net.layer1[0].bn1.training and not net.stem[1].training
    assert net.necks[0].training
    assert not any(p.requires_grad for p in net.layer3.parameters())
    assert all(p.requires_grad for p in net.stripe_convs.parameters())
    trainable_thetas = sum(t.requires_grad for t in reg.thetas)
    assert trainable_thetas == 2 * 2 + 3 * 2 + 3  # stripe convs (w, b), necks (g, b), classifiers
    task.set_backbone_frozen(False)
    task.train()
    assert net.layer1[0].bn1.training and all(t.requires_grad for t in reg.thetas)


def test_pretrained_path_errors(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="no such file"):
        ReidNet(3, "resnet18", pretrained=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(PretrainedWeightsError, match="does not fit"):
        ReidNet(3, "resnet18", pretrained=str(bad))


def test_pretrained_path_loads_torchvision_state(tmp_path):
    import torchvision

    src = torchvision.models.resnet18()
    f = tmp_path / "r18.pth"
    torch.save(src.state_dict(), f)
    net = ReidNet(3, "resnet18", pretrained=str(f))
    torch.testing.assert_close(net.stem[0].weight, src.conv1.weight)
    torch.testing.assert_close(net.layer4_regional[1].conv1.weight, src.layer4[1].conv1.weight)


def _triplet_loop(features, labels):
    n = len(labels)
    total = 0.0
    for a in range(n):
        d = [math.sqrt(float(((features[a] - features[j]) ** 2).sum()) + 1e-12) for j in range(n)]
        pos = max([d[j] for j in range(n) if labels[j] == labels[a] and j != a], default=0.0)
        neg = min(d[j] for j in range(n) if labels[j] != labels[a])
        total += math.log1p(math.exp(pos - neg))
    return total / n


@pytest.mark.parametrize("seed", range(3))
def test_triplet_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(12, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])[torch.randperm(12, generator=g)]
    got = batch_hard_triplet(feats, labels)
    assert got.item() == pytest.approx(_triplet_loop(feats, labels.tolist()), rel=1e-6)
    d = pairwise_euclidean(feats)
    assert torch.allclose(d.diagonal(), torch.full((12,), 1e-6, dtype=torch.float64))


def test_triplet_anchor_without_negative_gives_zero_as_the_seed():
    """One identity in the batch: TF's reduce_min over no negatives is +inf, softplus(-inf) = 0; the
    loss is 0 and passes no gradient (the seed's ~0), instead of substituting a distance."""
    g = torch.Generator().manual_seed(9)
    feats = torch.rand(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    loss = batch_hard_triplet(feats, torch.zeros(4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))
    # every anchor of a batch with two identities has a negative: the loop's value, finite gradients
    feats2 = torch.rand(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    loss2 = batch_hard_triplet(feats2, torch.tensor([0, 0, 1, 1]))
    assert loss2.item() == pytest.approx(_triplet_loop(feats2.detach(), [0, 0, 1, 1]), rel=1e-6) and loss2.item() > 0.1
    loss2.backward()
    assert torch.isfinite(feats2.grad).all() and feats2.grad.abs().sum() > 0


def test_label_smoothed_ce_formula():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 5, 2, 2, 1])
    target = torch.full((5, 6), 0.1 / 6, dtype=torch.float64)
    target[torch.arange(5), labels] += 0.9
    expected = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    assert identity_loss(logits, labels, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)


def test_task_losses_sum_to_total():
    torch.manual_seed(5)
    net = ReidNet(4, "resnet18")
    task = ReidTask(net, AdaptiveL2(net, FACTORS))
    x = torch.randn(8, 3, 64, 32)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    losses = task(x, y)
    assert set(losses) == {"ce_0", "ce_1", "ce_2", "triplet_0", "triplet_1", "triplet_2", "regularization", "total"}
    parts = sum(v for k, v in losses.items() if k != "total")
    torch.testing.assert_close(losses["total"], parts)
    losses["total"].backward()
    assert all(t.grad is not None for t in task.regularizer.thetas)


def test_imagenet_weights_unreachable_says_what_to_do(monkeypatch):
    import torchvision

    def offline(self, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(PretrainedWeightsError) as err:
        ReidNet(3, "resnet50", pretrained="imagenet")
    text = str(err.value)
    assert "resnet50-0676ba61.pth" in text and "checkpoints" in text and "model.pretrained=none" in text
