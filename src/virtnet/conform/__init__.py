"""``virtnet conform``: virtnet as the front-end, case by case, against any vhost-user
net back-end -- does it follow the protocol, does it survive a hostile front-end.

``cases`` (what is sent, what must happen), ``session`` / ``guest`` (the front-end they
speak through), ``runner`` (isolation, timeouts, the liveness check), ``report``.
"""
