"""FCN R50-D8 on VOC12+aug and Cityscapes (PROTOCOLS.md §8, §12, §13): dilated ResNet-50 with mmseg's FCN
heads and loss, whole-image or sliding-window inference, the mmseg 0.x training pipeline, and the mIoU evaluator.

    evaluator.py  confusion matrix over the val set (all ranks) -> per-class IoU, mIoU, aAcc
    model.py      dilated ResNet-50 (output stride 8), FCN decode + auxiliary heads, the mmseg 0.x loss,
                  whole / sliding-window inference
    data.py       VOC2012 train + aug / val and Cityscapes train / val, the train / eval pipelines
    train.py      training on the engine, evaluation every N iterations, resume
"""
