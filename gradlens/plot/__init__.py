"""Figures and summary tables from run directories. Reads runs only; never imports training code."""
