"""ImageNet weights: a torchvision-layout ResNet built in PyTorch with random weights, its
state dict imported into the JAX backbone, the two compared on the same input."""

import ml_collections
import numpy as np
import pytest
import torch
from torch import nn
from flax import nnx
from safetensors.torch import save_file

from moe_jax.models import backbone, moe, pretrained


class TorchBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation,
                           bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation,
                           bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
  """torchvision.models.ResNet's layout and forward with replace_stride_with_dilation=
  [False, False, True] (DeepLab's output stride 16), without the classifier's use."""

  def __init__(self, block, layers):
    super().__init__()
    self.inplanes, self.dilation = 64, 1
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make_layer(block, 64, layers[0])
    self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
    self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
    self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=True)
    self.fc = nn.Linear(512 * block.expansion, 1000)  # in the state dict, unused

  def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
    previous_dilation = self.dilation
    if dilate:
      self.dilation *= stride
      stride = 1
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    low = self.layer1(x)
    return low, self.layer4(self.layer3(self.layer2(low)))


def _random_torch_resnet(name):
  block, layers = {"resnet18": (TorchBasicBlock, [2, 2, 2, 2]),
                   "resnet50": (TorchBottleneck, [3, 4, 6, 3])}[name]
  torch.manual_seed(0)
  model = TorchResNet(block, layers)
  with torch.no_grad():  # BatchNorm statistics and affine parameters away from 0 and 1
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.2, 0.2)
        module.running_mean.uniform_(-0.2, 0.2)
        module.running_var.uniform_(0.5, 1.5)
  return model.eval()


def _built(make):
  """`make()` under jit: eager initialisation of a width-1 ResNet runs op by op (~8 s for
  ResNet-18 here), compiled it takes a fraction of that."""
  return nnx.jit(make)()


@pytest.mark.parametrize("name, suffix", [("resnet18", ".pth"), ("resnet50", ".safetensors")])
def test_imported_backbone_matches_pytorch(tmp_path, name, suffix):
  model = _random_torch_resnet(name)
  path = tmp_path / f"{name}{suffix}"
  if suffix == ".pth":
    torch.save(model.state_dict(), path)
  else:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  ours = _built(lambda: backbone.ResNet(name, rngs=nnx.Rngs(0)))
  pretrained.load_backbone(ours, path)
  ours.eval()
  images = np.random.default_rng(0).random((2, 64, 96, 3), np.float32)
  with torch.no_grad():
    low, out = (t.permute(0, 2, 3, 1).numpy()
                for t in model(torch.from_numpy(images.transpose(0, 3, 1, 2))))
  our_low, our_out = nnx.jit(lambda m, x: m(x))(ours, images)
  assert our_out.shape == out.shape == (2, 4, 6, 512 * (4 if name == "resnet50" else 1))
  np.testing.assert_allclose(our_low, low, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(our_out, out, atol=1e-4, rtol=1e-4)


def test_stacked_members_all_get_the_weights_and_bad_files_say_why(tmp_path):
  model = _random_torch_resnet("resnet18")
  path = tmp_path / "resnet18.pth"
  torch.save(model.state_dict(), path)
  config = ml_collections.ConfigDict(dict(backbone="resnet18", width=1.0, aspp_channels=16,
                                          aspp_dropout=0.1, decoder_dropout=0.0))
  experts = _built(lambda: moe.StackedExperts(moe.make_expert(config, 5), 2,
                                             execution="vmap", rngs=nnx.Rngs(0)))
  pretrained.load_backbone(experts.members.backbone, path)  # as the experts stage does
  expected = model.conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
  for k in range(2):
    np.testing.assert_allclose(experts.members.backbone.conv1.kernel.value[k], expected)
    np.testing.assert_allclose(experts.members.backbone.layer4[1].bn2.var.value[k],
                               model.layer4[1].bn2.running_var.numpy())
  def abstract(name, width=1.0):  # only shapes matter before the errors below
    return nnx.eval_shape(lambda: backbone.ResNet(name, width=width, rngs=nnx.Rngs(0)))

  with pytest.raises(ValueError, match="no such file"):
    pretrained.load_backbone(abstract("resnet18"), tmp_path / "x.pth")
  with pytest.raises(ValueError, match="ImageNet weights need model.width=1.0"):
    pretrained.load_backbone(abstract("resnet18", 0.5), path)
  with pytest.raises(ValueError, match=r"no tensor 'layer1\.0\.(bn|conv)3\."):
    pretrained.load_backbone(abstract("resnet50"), path)
  (tmp_path / "w.npz").write_bytes(b"")
  with pytest.raises(ValueError, match="unknown file type '.npz'"):
    pretrained.load_backbone(abstract("resnet18"), tmp_path / "w.npz")


class _Payload:
  """Unpickling this creates the file `marker`: what a malicious checkpoint would run."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return open, (self.marker, "w")


def test_a_pth_holding_python_objects_is_refused_and_nothing_in_it_runs(tmp_path):
  path, marker = tmp_path / "evil.pth", tmp_path / "ran"
  state = _random_torch_resnet("resnet18").state_dict()
  torch.save({**state, "extra": _Payload(marker)}, path)
  with pytest.raises(ValueError, match=r"refused: the file holds Python objects besides "
                     r"tensors \(io.open\), and they are not loaded"):
    pretrained.read_state_dict(path)
  assert not marker.exists()
  # The payload is real: loading without weights_only runs it.
  torch.load(path, weights_only=False)
  assert marker.exists()
