"""A missing modality's encoder must not move (issue 13, item 0): the bundle's real trainer, optimizer and DTM."""

from __future__ import annotations

import os

import torch

from test_bundle import BUNDLE, data_dir  # noqa: F401  (module fixture: tiny BraTS set with a datalist)


def _batch(mask: list[bool], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 4, 32, 32, 32, generator=g)
    present = torch.tensor([mask])
    image = image * present[:, :, None, None, None]
    label = torch.randint(0, 4, (1, 1, 32, 32, 32), generator=g).float()
    return {"image": image, "label": label, "modality_mask": present}


def test_absent_modality_keeps_its_encoder_optimizer_state_and_dtm_gradient(data_dir, tmp_path):  # noqa: F811
    """Iteration 1 has every modality; iteration 2 lacks t1ce (m = 2). After iteration 2, encoder 2's weights, its
    AdamW state (step count, moments) and DTM's previous gradient for it are exactly those after iteration 1, while
    a present encoder did move. With gradients zeroed instead of set to None, AdamW would keep stepping encoder 2 on
    stale momentum and weight decay, and DTM would store a zero vector as its previous gradient."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=os.path.join(BUNDLE, "configs", "train.json"),
        workflow_type="train",
        dataset_dir=str(data_dir),
        bundle_root=str(tmp_path),
        max_epochs=1,
        val_interval=100,
        roi_size=[32, 32, 32],
        channels=[4, 8, 16, 32],
        num_layers=1,
        num_workers=0,
    )
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    network = wf.parser.get_parsed_content("network")
    optimizer = wf.parser.get_parsed_content("optimizer")
    dtm = wf.parser.get_parsed_content("dtm")
    batches = [_batch([True, True, True, True], 1), _batch([True, True, False, True], 2)]
    trainer.data_loader = batches
    trainer.state.epoch_length = len(batches)
    absent, present = network.encoders[2], network.encoders[0]
    snaps = {}

    def snapshot(encoder):
        params = [p.detach().clone() for p in encoder.parameters()]
        state = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in encoder.parameters()]
        return params, state

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        snaps[engine.state.iteration] = {
            "absent": snapshot(absent),
            "present": snapshot(present),
            "prev_grad": dtm.prev_grads[2].clone(),
        }

    trainer.run()
    first, second = snaps[1], snaps[2]
    for before, after in zip(first["absent"][0], second["absent"][0]):
        assert torch.equal(before, after)
    for before, after in zip(first["absent"][1], second["absent"][1]):
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert float(first["absent"][1][0]["step"]) == 1.0  # the optimizer stepped it once, when it was present
    assert torch.equal(first["prev_grad"], second["prev_grad"]) and bool(second["prev_grad"].abs().sum() > 0)
    assert float(second["present"][1][0]["step"]) == 2.0
    assert any(not torch.equal(a, b) for a, b in zip(first["present"][0], second["present"][0]))
