"""Deployment across sites: certificates, site keys, and submitting runs to a SuperLink."""
