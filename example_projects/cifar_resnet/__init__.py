"""Claim 5 and Tables 1-2 of Huang et al. (2020): the last linear layer of deep CIFAR ResNets."""
