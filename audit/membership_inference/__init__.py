"""Membership inference: can an attacker tell training images from unseen ones?"""
