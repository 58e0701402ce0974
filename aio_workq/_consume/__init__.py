"""Consuming: the worker, subscriptions, dispatch, handler execution, failure routing, jobs and
dead letters."""
