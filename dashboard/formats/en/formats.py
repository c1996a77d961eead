# Times to the second wherever a full date and time is shown (admin lists, titles):
# an audit trail read to the minute hides the order of what happened.
DATETIME_FORMAT = "N j, Y, H:i:s"
SHORT_DATETIME_FORMAT = "Y-m-d H:i:s"
