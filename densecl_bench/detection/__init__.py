"""Detection benchmarks: the VOC AP evaluator, Faster R-CNN R50-C4 on torchvision parts, VOC detection data."""
