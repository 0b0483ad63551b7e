"""Model shapes, stacked experts against separately built ones, routers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from moe_jax.models import backbone, deeplab, moe, routers

SMALL = ml_collections.ConfigDict(dict(backbone="resnet10", width=0.25, aspp_channels=16,
                                       aspp_dropout=0.1, decoder_dropout=0.0))
C, H, W = 5, 32, 48


@nnx.jit(static_argnames="per_expert")
def call(module, x, per_expert=None):
  """One compiled call: eager NNX runs op by op and is several times slower on CPU."""
  return module(x) if per_expert is None else module(x, per_expert=per_expert)


def images(batch=2, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, H, W, 3))


@pytest.mark.parametrize("name, low, out", [("resnet18", 16, 128), ("resnet50", 64, 512)])
def test_backbone_output_stride_16(name, low, out):
  net = backbone.ResNet(name, width=0.25, rngs=nnx.Rngs(0))
  low_level, features = call(net, images())
  assert low_level.shape == (2, H // 4, W // 4, low)
  assert features.shape == (2, H // 16, W // 16, out)


def test_backbone_has_torchvision_names_and_dilation():
  net = backbone.ResNet("resnet101", width=0.125, rngs=nnx.Rngs(0))
  assert len(net.layer3) == 23 and net.layer1[0].downsample is not None
  assert net.layer4[0].conv2.strides == (1, 1) or net.layer4[0].conv2.strides == 1
  assert net.layer4[0].conv2.kernel_dilation in (1, (1, 1))
  assert net.layer4[1].conv2.kernel_dilation in (2, (2, 2))


def test_unknown_backbone_names_the_key():
  with pytest.raises(ValueError, match="model.backbone='resnet7'"):
    backbone.ResNet("resnet7", rngs=nnx.Rngs(0))


def test_deeplab_shapes():
  model = moe.make_expert(SMALL, C)(nnx.Rngs(0))
  logits, aspp = call(model, images())
  assert logits.shape == (2, H, W, C) and aspp.shape == (2, H // 16, W // 16, 16)


def test_resize_bilinear_matches_half_pixel_centres():
  x = jnp.arange(4.0).reshape(1, 1, 4, 1)
  # PyTorch F.interpolate(scale 2, bilinear, align_corners=False) of [0,1,2,3]:
  expected = [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3]
  np.testing.assert_allclose(deeplab.resize_bilinear(x, 1, 8)[0, 0, :, 0], expected)


@pytest.mark.parametrize("size, out", [((3, 5), (6, 15)), ((6, 10), (24, 40)),
                                       ((3, 3), (9, 9)), ((4, 4), (20, 12)), ((4, 6), (6, 9))])
def test_resize_bilinear_equals_jax_image_resize(size, out):
  """The whole-factor path (blended shifted copies) is the same function as jax.image's
  interpolation matrices, edges included; other sizes go to jax.image itself."""
  x = jax.random.normal(jax.random.key(0), (2, *size, 3))
  np.testing.assert_allclose(deeplab.resize_bilinear(x, *out),
                             jax.image.resize(x, (2, *out, 3), "bilinear"), atol=2e-6)


def test_decoder_split_into_its_inputs_equals_the_conv_on_their_concatenation():
  model = moe.make_expert(SMALL, C)(nnx.Rngs(0))
  model.eval()
  up, low = (jax.random.normal(jax.random.key(i), (2, 8, 12, ch)) for i, ch in ((1, 16), (2, 48)))
  np.testing.assert_allclose(model._decode(up, low),
                             model.decoder(jnp.concatenate([up, low], axis=-1)), atol=1e-5)


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("gate", ["simple", "classwise", "pixel"])
def test_moe_shapes_and_gate_weights_sum_to_one(k, gate):
  # "vmap" compiles one expert's graph for any K ("unroll" would compile K of them).
  experts = moe.StackedExperts(moe.make_expert(SMALL, C), k, execution="vmap",
                               rngs=nnx.Rngs(0))
  model = moe.MixtureOfExperts(experts, num_classes=C, image_size=(H, W), gate=gate,
                               fusion_conv=True, rngs=nnx.Rngs(1))
  model.eval()
  out = call(model, images(3))
  assert out["logits"].shape == (3, H, W, C)
  assert out["expert_logits"].shape == (k, 3, H, W, C)
  routing = out["routing"]
  assert routing.unit == {"simple": "image", "classwise": "class", "pixel": "pixel"}[gate]
  assert routing.logits.shape == routing.weights.shape and routing.aux_losses == {}
  weights = routing.weights
  assert weights.shape == {"simple": (1, 3, k), "classwise": (1, 3, C, k),
                           "pixel": (1, 3, H, W, k)}[gate]
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  assert (weights >= 0).all()


def separate_and_stacked(k, execution):
  separate = [moe.make_expert(SMALL, C)(nnx.Rngs(10 + i)) for i in range(k)]
  stacked = moe.StackedExperts(moe.make_expert(SMALL, C), k, execution=execution,
                               rngs=nnx.Rngs(0))
  states = [nnx.state(m) for m in separate]
  nnx.update(stacked.members, jax.tree.map(lambda *a: jnp.stack(a), *states))
  return separate, stacked


@pytest.mark.parametrize("execution", moe.EXECUTIONS)
def test_stacked_experts_equal_separately_built_experts(execution):
  separate, stacked = separate_and_stacked(3, execution)
  for m in separate:
    m.eval()
  stacked.eval()
  x = images()
  logits, aspp = call(stacked, x)
  for k, m in enumerate(separate):
    ref_logits, ref_aspp = call(m, x)
    np.testing.assert_allclose(logits[k], ref_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(aspp[k], ref_aspp, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("execution", moe.EXECUTIONS)
def test_stacked_training_forward_updates_each_members_batch_statistics(execution):
  separate, stacked = separate_and_stacked(2, execution)
  batches = jnp.stack([images(seed=1), images(seed=2)])  # one batch per expert
  for m in (*separate, stacked):  # batch statistics on, dropout off (its keys differ)
    m.set_attributes(use_running_average=False, deterministic=True, raise_if_not_found=False)
  call(stacked, batches, per_expert=True)
  for k, m in enumerate(separate):
    call(m, batches[k])
    np.testing.assert_allclose(stacked.members.backbone.bn1.mean[k], m.backbone.bn1.mean,
                               rtol=1e-5, atol=1e-6)
  assert not np.allclose(stacked.members.backbone.bn1.mean[0],
                         stacked.members.backbone.bn1.mean[1])


def test_classwise_gate_is_c_independent_simple_gates():
  args = routers.RouterArgs(in_ch=8, feature_hw=(2, 3), num_experts=2, num_classes=4,
                            hidden=6)
  gate = routers.make("classwise", args, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (5, 2, 3, 8))
  weights = gate(x, output_size=(32, 48)).weights[0]
  graphdef, state = nnx.split(gate.gates)
  for c in range(4):
    simple = nnx.merge(graphdef, jax.tree.map(lambda a: a[c], state))
    np.testing.assert_allclose(weights[:, c], simple(x, output_size=(32, 48)).weights[0],
                               rtol=1e-5, atol=1e-6)


def test_fuse_sample_is_the_weighted_sum_of_logits():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 4, 5, 6))  # K=2, B=3
  w = jax.nn.softmax(jax.random.normal(jax.random.key(1), (3, 2)))
  expected = w[:, 0, None, None, None] * logits[0] + w[:, 1, None, None, None] * logits[1]
  np.testing.assert_allclose(routers.fuse_sample(logits, w, "image"), expected, rtol=1e-5,
                             atol=1e-6)
  wc = jax.nn.softmax(jax.random.normal(jax.random.key(2), (3, 6, 2)))
  expected = (wc[:, None, None, :, 0] * logits[0] + wc[:, None, None, :, 1] * logits[1])
  np.testing.assert_allclose(routers.fuse_sample(logits, wc, "class"), expected, rtol=1e-5,
                             atol=1e-6)
  wp = jax.nn.softmax(jax.random.normal(jax.random.key(3), (3, 4, 5, 2)))  # [B,H,W,K]
  expected = wp[..., 0, None] * logits[0] + wp[..., 1, None] * logits[1]
  np.testing.assert_allclose(routers.fuse_sample(logits, wp, "pixel"), expected, rtol=1e-5,
                             atol=1e-6)


def test_image_size_must_be_a_multiple_of_16():
  experts = moe.StackedExperts(moe.make_expert(SMALL, C), 2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"data.image_size=\(30, 48\) must be multiples of 16"):
    moe.MixtureOfExperts(experts, num_classes=C, image_size=(30, 48), rngs=nnx.Rngs(1))
