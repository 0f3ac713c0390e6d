"""Model functions outside torchvision and timm, named in `models:` as `food101.contrib.<module>:<function>`."""
