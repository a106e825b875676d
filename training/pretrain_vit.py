"""Stage 1, ViT pretraining: an entry script; the code is mmfusion/training/pretrain_vit.py.

    python training/pretrain_vit.py --help                      # or: mmfusion pretrain-vit --help
    python -m training.pretrain_vit ...                         # from the repository root
    accelerate launch -m training.pretrain_vit ...              # many processes
"""

from mmfusion.training.pretrain_vit import script

if __name__ == "__main__":
    script()
