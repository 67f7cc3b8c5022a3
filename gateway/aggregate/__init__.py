"""The aggregate endpoint's shared vocabulary: exposed names (``naming``), views
(``views``), sealed session ids (``session_token``) and sealed list cursors (``cursor``). Pure
code used alike by ext_authz, the aggregator and the Envoy config renderer."""
