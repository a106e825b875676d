"""Stage 2, VQA / caption fine-tuning: an entry script; the code is mmfusion/training/train_vqa.py.

    python training/train_vqa.py --help                      # or: mmfusion train-vqa --help
    python -m training.train_vqa ...                         # from the repository root
    accelerate launch -m training.train_vqa ...              # many processes
"""

from mmfusion.training.train_vqa import script

if __name__ == "__main__":
    script()
