import numpy as np

from experiments.shapes.shapes_diagnostics import best_proposal_ious, recall_row


def test_best_proposal_iou_is_the_best_over_proposals_of_each_object():
    truth = np.zeros((2, 4, 4), bool)
    truth[0, :2, :2] = True  # 4 px
    truth[1, 2:, :] = True  # 8 px
    proposals = np.zeros((3, 4, 4), bool)
    proposals[0, :2, :1] = True  # 2 px inside object 0: IoU 0.5
    proposals[1, :, :] = True  # everything: IoU 4/16 and 8/16
    proposals[2, 3:, :] = True  # half of object 1: IoU 0.5
    np.testing.assert_allclose(best_proposal_ious(proposals, truth), [0.5, 0.5])
    np.testing.assert_allclose(best_proposal_ious(proposals[:0], truth), [0.0, 0.0])  # no proposals at all
    row = recall_row(np.array([0.5, 0.8, 0.2]))
    assert row["objects"] == 3 and row["recall@0.5"] == 2 / 3 and row["recall@0.75"] == 1 / 3
