"""Copy detection: is a synthetic image a (near-)copy of a training image?"""
