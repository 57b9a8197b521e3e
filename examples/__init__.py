"""Runnable examples of lightning_adv."""
