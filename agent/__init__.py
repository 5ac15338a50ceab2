"""rarewrite: a web server writing a file that no other server in the fleet writes.

The import package is named ``agent``; it holds the on-host agent and, in
``agent.collector``, the central collector. Both share the rule
(``agent.shared.rule``) and the wire format (``agent.shared.wire``).
"""

__version__ = "0.1.0"
