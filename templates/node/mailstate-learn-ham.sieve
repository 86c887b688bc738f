# mailstate / pi-pull (docs/inbound.md): Dovecot's IMAPSieve runs this when a message is moved or
# copied out of Junk over IMAP: rspamd learns it as ham, unless it went into Trash (deleting spam
# says nothing about it). :try: a learn that fails never fails the move.
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];
if environment :matches "imap.mailbox" "*" {
  set "mailbox" "${1}";
}
if string :is "${mailbox}" "Trash" {
  stop;
}
pipe :copy :try "rspamd-learn" ["ham"];
