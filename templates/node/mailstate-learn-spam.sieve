# mailstate / pi-pull (docs/inbound.md): Dovecot's IMAPSieve runs this when a message is moved or
# copied into Junk over IMAP: rspamd's Bayes classifier learns it as spam (the rspamd-learn program
# asks the controller on loopback). :try: a learn that fails never fails the move.
require ["vnd.dovecot.pipe", "copy", "imapsieve"];
pipe :copy :try "rspamd-learn" ["spam"];
