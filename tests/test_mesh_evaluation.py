"""Evaluation on 4 forced CPU devices (moe_jax/sharding.py): an MoE with its experts and
ensemble, its panels, the calibrate stage's grid values, and the baseline with MC dropout
give one device's numbers bit for bit under the meshes (data, expert) = (4, 1), (2, 2),
(1, 4). Under XLA CPU's default code generation, which users run: with the tests' faster
elemental emitters one device and a mesh differ by rounding (forced_devices.default_codegen).
Training on the meshes: tests/test_mesh.py."""

import json

import pytest

import forced_devices

SCRIPT = forced_devices.MESH_SETUP + r"""
experts = build.experts(config, K)
experts.eval()
moe = build.mixture(config, experts, "simple")
moe.eval()
dropout = config.copy_and_resolve_references()
dropout.model.aspp_dropout = 0.5
baseline = build.baseline(dropout)
baseline.eval()
outputs = methods.mixtures_with("weighted")

evaluated = {}
for shape in SHAPES:
  mesh = mesh_of(shape)
  placed = sharding.placed_copy((moe,), mesh)
  panels = {}
  totals = evaluate.accumulate(outputs, placed, eval_batches, 38, uncertainty=True,
                               panel_images=1, patch_size=4, panels=panels)
  # The baseline and MC dropout (2 passes, their keys folded per micro-batch).
  totals.update(evaluate.accumulate(methods.single_and_mc_dropout_with((2,)),
                                    sharding.placed_copy(baseline, mesh), eval_batches, 38,
                                    uncertainty=True))
  grid = calibrate.grid_values(
      lambda models, images, key, extras: outputs(models, images, key), placed,
      eval_batches[0], build.key(0), ("moe_0",), 3, None, None, mesh, 1)
  evaluated[shape] = (totals, panels["maps"], grid)

unequal = {}
for shape, got in evaluated.items():
  for name, a, b in zip(("statistics", "panels", "grid values"), evaluated[(1, 1)], got):
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(a) == len(b) > 0
    unequal[f"{shape} {name}"] = sum(int(np.sum(np.asarray(x) != np.asarray(y)))
                                     for x, y in zip(a, b))
print(json.dumps(unequal))
"""


@pytest.mark.slow
def test_evaluation_under_every_mesh_equals_one_device_bit_for_bit():
  result = forced_devices.run(SCRIPT, xla_defaults=True)
  assert result.returncode == 0, result.stderr[-4000:]
  unequal = json.loads(result.stdout.strip().splitlines()[-1])
  print(unequal)
  # Each micro-batch runs alone through the same program on every mesh.
  for shape in forced_devices.MESHES:
    for name in ("statistics", "panels", "grid values"):
      assert unequal[f"{shape} {name}"] == 0, (shape, name, unequal)
