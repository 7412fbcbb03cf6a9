"""Instance segmentation without prompts: a SOLOv2 student head on SAM's frozen embedding, Matrix
NMS and COCO mask AP (see docs/architecture.md, "Instance segmentation student")."""

from samflow.instance.coco_ap import CocoMaskAP
from samflow.instance.matrix_nms import matrix_nms
from samflow.instance.solov2 import SOLOv2Head

__all__ = ["CocoMaskAP", "SOLOv2Head", "matrix_nms"]
