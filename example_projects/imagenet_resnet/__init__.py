"""Table A1 of Huang et al. (2020): torchvision ResNet-18/50 with and without LastBN on ImageNet."""
