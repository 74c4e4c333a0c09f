"""ssl_ad.train"""
